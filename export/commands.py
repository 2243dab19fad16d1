"""`openset export onnx | verify | tensorrt`: the export subcommands (registered in `service.cli`).

openset export onnx --model demo --out exports/demo --dynamic [--msda plugin|portable] [--opset 18]
openset export onnx --model openseed-swint --checkpoint X --out exports/openseed --size 640x640
openset export verify exports/demo [--reference ../shared/reference/xdecoder_focalt/case_a]
openset export tensorrt --onnx exports/demo --out engines/demo [--fp16] [--profiles segmentation ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.manifest import MSDA_FORMS
from export.symbolics import MIN_OPSET
from export.tensorrt_profiles import TASK_GRAPHS


def parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W), each a positive multiple of 32."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not HxW (e.g. 512x512)") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"size {text!r}: both sides must be positive multiples of 32")
    return h, w


def add_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a model to ONNX / TensorRT and verify exports")
    commands = parser.add_subparsers(title="export commands", metavar="KIND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    onnx = commands.add_parser("onnx", help="export the model's graphs to ONNX with a manifest")
    onnx.add_argument("--model", required=True, help="named model config (models.configs)")
    onnx.add_argument("--checkpoint", default=None, help="weights file (default: the config's own)")
    onnx.add_argument("--out", required=True, type=Path, help="output directory")
    onnx.add_argument(
        "--msda",
        choices=sorted(MSDA_FORMS),
        default="plugin",
        help="deformable attention as TensorRT's plugin node, or as portable GridSample ops (fixed sizes)",
    )
    onnx.add_argument(
        "--dynamic", action="store_true", help="dynamic image height and width (X-Decoder models only)"
    )
    onnx.add_argument("--size", type=parse_size, action="append", help="fixed image size HxW (repeatable)")
    onnx.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    onnx.set_defaults(func=run_onnx)

    verify = commands.add_parser("verify", help="compare an ONNX export with torch")
    verify.add_argument("directory", type=Path, help="an `openset export onnx` output directory")
    verify.add_argument("--checkpoint", default=None, help="weights (default: the one of the export)")
    verify.add_argument("--size", type=parse_size, action="append", help="image size HxW to check")
    verify.add_argument("--seed", type=int, default=1)
    verify.add_argument("--reference", type=Path, default=None, help="golden case folder to compare too")
    verify.set_defaults(func=run_verify)

    trt = commands.add_parser("tensorrt", help="build TensorRT engines from an ONNX export")
    trt.add_argument("--onnx", required=True, type=Path, help="an `openset export onnx` output directory")
    trt.add_argument("--out", required=True, type=Path, help="output directory for the engines")
    trt.add_argument("--fp16", action="store_true", help="allow fp16 kernels")
    trt.add_argument(
        "--profiles",
        nargs="+",
        choices=list(TASK_GRAPHS),
        default=None,
        help="tasks to build optimisation profiles for (default: all), one per size bucket",
    )
    trt.add_argument("--max-batch-size", type=int, default=8, help="the service's OPENSET_MAX_BATCH_SIZE")
    trt.add_argument("--workspace-gib", type=float, default=4.0)
    trt.set_defaults(func=run_tensorrt)


def run_onnx(args: argparse.Namespace) -> int:
    from export.onnx_graphs import export_onnx_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = export_onnx_model(
        args.model, args.checkpoint, args.out, args.msda, args.dynamic, args.opset, args.size
    )
    for entry in manifest.graphs:
        print(f"{args.out / entry.file}  sha256 {entry.sha256[:16]}")
    print(f"{args.out / 'manifest.json'}  ({manifest.model}@{manifest.weights_id}, msda {manifest.msda})")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from export.verify import verify_export

    checks = verify_export(args.directory, args.checkpoint, args.size, args.seed, args.reference)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


def run_tensorrt(args: argparse.Namespace) -> int:
    from export.tensorrt_build import build_engines

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = build_engines(
            args.onnx, args.out, args.fp16, args.profiles, args.max_batch_size, args.workspace_gib
        )
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for entry in manifest.graphs:
        print(f"{args.out / entry.file}  sha256 {entry.sha256[:16]}")
    return 0
