"""The runtimes on a GPU machine, in one run (called by load_tests/gpu_check.sh):

    python load_tests/gpu_runtimes.py [--models demo,xdecoder-focalt] [--batches 1,4] [--repeats 10]

Per model: export to ONNX (plugin MSDA form, dynamic sizes), build TensorRT engines in fp32 and fp16
(`openset export tensorrt`, profiles of the batcher's buckets), then on the same seeded batch compare
the segmentation image pass and the greedy caption tokens of each runtime with torch CUDA, and time
the image pass (images/s): torch CUDA, onnxruntime CUDA (where onnxruntime-gpu is installed),
TensorRT fp32 and fp16. A runtime that is not installed is reported as skipped, not failed.

Prints one `ROW|name|pass,fail,skipped|detail` line per check (gpu_check.sh turns them into its
table) and writes JSON to load_tests/results/gpu_runtimes.json. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from export.onnx_graphs import export_onnx_model
from export.runtime import load_exported
from export.tensorrt_build import build_engines
from models.checkpoint import reference_checkpoint
from models.predictor import build_model
from models.preprocess import padded_size

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "gpu_runtimes"
# Largest |runtime - torch| of the mask logits, relative to max |torch| (fp16 halves the mantissa).
TOLERANCE = {"onnxruntime-cuda": 1e-3, "tensorrt-fp32": 1e-3, "tensorrt-fp16": 3e-2}
ROWS: list[dict] = []


def row(name: str, status: str, detail: str) -> None:
    ROWS.append({"check": name, "status": status, "detail": detail})
    print(f"ROW|{name}|{status}|{detail}", flush=True)


def image_pass(model, images: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 (torch or exported model)
    features = model.encode_images(images, None)
    head, _ = model.decoder.forward_seg(features.memory)
    return head.masks


def speed(model, images: torch.Tensor, repeats: int) -> float:  # noqa: ANN001
    """Images per second of the image pass (median over repeats, after one warm-up)."""
    image_pass(model, images)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        image_pass(model, images)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return images.shape[0] / statistics.median(times)


def check_model(name: str, batches: list[int], repeats: int) -> None:
    checkpoint = None
    if name != "demo":
        keys = ROOT.parent / "shared" / "reference" / name.replace("-", "_") / "keys.json"
        checkpoint = reference_checkpoint(keys, ROOT / ".cache" / "tests")
    model, _ = build_model(name, checkpoint)
    model = model.cuda()
    onnx_dir = CACHE / name / "onnx"
    export_onnx_model(name, checkpoint, onnx_dir, msda="plugin", dynamic=True)
    runtimes: dict[str, object] = {}
    if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
        runtimes["onnxruntime-cuda"] = load_exported(onnx_dir, "onnxruntime", "cuda")
    else:
        row(f"{name} onnxruntime-cuda", "skipped", "onnxruntime-gpu not installed")
    if importlib.util.find_spec("tensorrt") is None:
        row(f"{name} tensorrt", "skipped", "TensorRT not installed (pip install '.[tensorrt]')")
    else:
        for precision in ("fp32", "fp16"):
            engines = CACHE / name / f"tensorrt-{precision}"
            try:
                start = time.perf_counter()
                build_engines(onnx_dir, engines, fp16=precision == "fp16", max_batch_size=max(batches))
                row(f"{name} tensorrt build {precision}", "pass", f"{time.perf_counter() - start:.0f} s")
                runtimes[f"tensorrt-{precision}"] = load_exported(engines, "tensorrt", "cuda")
            except Exception as exc:  # reported as a failed check, the others still run
                row(f"{name} tensorrt build {precision}", "fail", f"{type(exc).__name__}: {exc}"[:300])
    rule = model.cfg.resize["segmentation"]
    size = padded_size(*rule.nominal_size())
    with torch.inference_mode():
        for batch in batches:
            images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch)).cuda()
            reference = image_pass(model, images)
            timing = {"torch-cuda": speed(model, images, repeats)}
            for runtime, exported in runtimes.items():
                masks = image_pass(exported, images).float()
                error = float((masks - reference).abs().max() / reference.abs().max())
                ok = error <= TOLERANCE[runtime]
                row(
                    f"{name} {runtime} parity b{batch}",
                    "pass" if ok else "fail",
                    f"max rel error {error:.1e}",
                )
                timing[runtime] = speed(exported, images, repeats)
            ratios = ", ".join(
                f"{k} {v:.1f} img/s ({v / timing['torch-cuda']:.2f}x)" for k, v in timing.items()
            )
            row(f"{name} speed {size[0]}x{size[1]} b{batch}", "pass", ratios)
        caption = model.cfg.resize["captioning"].fixed or size
        images = torch.randn(2, 3, *caption, generator=torch.Generator().manual_seed(7)).cuda()
        tokens = model.greedy_caption(model.encode_images(images), 20, early_stop=False)
        for runtime, exported in runtimes.items():
            ours = exported.greedy_caption(exported.encode_images(images), 20, early_stop=False)
            same = bool(torch.equal(ours.cpu(), tokens.cpu()))
            status = "pass" if same or runtime == "tensorrt-fp16" else "fail"
            row(f"{name} {runtime} caption tokens", status, "equal to torch" if same else "differ from torch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,xdecoder-focalt")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        row("runtimes on gpu", "skipped", "no CUDA device")
        return 0
    for name in args.models.split(","):
        try:
            check_model(name, [int(b) for b in args.batches.split(",")], args.repeats)
        except Exception as exc:
            row(f"{name} runtimes", "fail", f"{type(exc).__name__}: {exc}"[:300])
    out = ROOT / "load_tests" / "results" / "gpu_runtimes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ROWS, indent=2) + "\n")
    return 1 if any(r["status"] == "fail" for r in ROWS) else 0


if __name__ == "__main__":
    raise SystemExit(main())
