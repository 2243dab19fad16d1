"""Torch eager against ONNX Runtime on this CPU: the image side of segmentation (image encoder and
segmentation decoder, through the same calls the Predictor makes) for the demo model and Focal-T.

    python load_tests/bench_runtimes.py [--models demo,xdecoder-focalt] [--batches 1,4]
                                        [--threads 1] [--repeats 5] [--focalt-size 512x512]

Each model is exported once (plugin MSDA form, dynamic sizes) into .cache/bench_runtimes/ and reused
while its manifest matches the weights and config. Both runtimes get the same thread count and run
interleaved (torch, onnxruntime, torch, ...) on the same seeded batch, so their ratio comes from one
run under the same load; the outputs are compared too. Reports images/s (median over repeats) and
the onnxruntime / torch speed ratio; writes JSON to load_tests/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from export.manifest import read_manifest
from export.onnx_graphs import export_onnx_model
from export.runtime import load_exported
from models.checkpoint import reference_checkpoint
from models.predictor import build_model

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_runtimes"
REFERENCE = ROOT.parent / "shared" / "reference"


def checkpoint_of(name: str) -> Path | None:
    if name == "demo":
        return None
    keys = REFERENCE / name.replace("-", "_") / "keys.json"
    return reference_checkpoint(keys, ROOT / ".cache" / "tests")


def export_dir(name: str, checkpoint: Path | None, weights_id: str) -> Path:
    """The cached export of `name`, made again when its weights or config changed."""
    out = CACHE / name
    try:
        manifest = read_manifest(out)
        from export.manifest import check_config

        check_config(manifest)
        if manifest.weights_id == weights_id and manifest.dynamic and manifest.msda == "plugin":
            return out
    except (FileNotFoundError, ValueError):
        pass
    print(f"exporting {name} to {out} ...", flush=True)
    export_onnx_model(name, checkpoint, out, msda="plugin", dynamic=True)
    return out


def image_pass(model, images: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 (torch or exported model)
    """What `Predictor.segment` runs on the model: encode, then the segmentation decoder."""
    features = model.encode_images(images, None)
    head, _ = model.decoder.forward_seg(features.memory)
    return head.masks


def bench_model(
    name: str, size: tuple[int, int], batches: list[int], repeats: int, threads: int
) -> list[dict]:
    checkpoint = checkpoint_of(name)
    model, weights_id = build_model(name, checkpoint)
    exported = load_exported(export_dir(name, checkpoint, weights_id), "onnxruntime", threads=threads)
    rows = []
    for batch in batches:
        images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        outputs = {}
        with torch.inference_mode():
            for runtime, runner in (("torch", model), ("onnxruntime", exported)):
                outputs[runtime] = image_pass(runner, images)  # warm-up (and the outputs to compare)
            for _ in range(repeats):
                for runtime, runner in (("torch", model), ("onnxruntime", exported)):
                    start = time.perf_counter()
                    image_pass(runner, images)
                    times[runtime].append(time.perf_counter() - start)
        speed = {k: batch / statistics.median(v) for k, v in times.items()}
        row = {
            "model": name,
            "size": list(size),
            "batch": batch,
            "torch_images_per_s": round(speed["torch"], 3),
            "onnxruntime_images_per_s": round(speed["onnxruntime"], 3),
            "ratio_onnxruntime_over_torch": round(speed["onnxruntime"] / speed["torch"], 3),
            "max_abs_diff_masks": float((outputs["torch"] - outputs["onnxruntime"]).abs().max()),
        }
        print(
            f"{name:<16} {size[0]}x{size[1]:<5} batch {batch}:  torch {speed['torch']:8.2f} img/s  "
            f"onnxruntime {speed['onnxruntime']:8.2f} img/s  ratio {row['ratio_onnxruntime_over_torch']:.2f}"
            f"  (max |diff| {row['max_abs_diff_masks']:.1e})",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,xdecoder-focalt")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--focalt-size", default="512x512", help="Focal-T input HxW (demo: its own size)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.models.split(","):
        if name == "demo":
            rule = build_model("demo", None)[0].cfg.resize["segmentation"]
            size = rule.nominal_size()
        else:
            h, w = (int(v) for v in args.focalt_size.split("x"))
            size = (h, w)
        rows += bench_model(name, size, batches, args.repeats, args.threads)
    out = (
        ROOT
        / "load_tests"
        / "results"
        / f"bench_runtimes-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "cpu": platform.processor(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
