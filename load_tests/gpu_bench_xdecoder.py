"""X-Decoder on a GPU: segmentation throughput per precision and batch, parity of the low precisions,
captions/s and encode_texts, as rows for `load_tests/gpu_check.sh`.

    python load_tests/gpu_bench_xdecoder.py --device cuda [--rows FILE] [--json FILE]
    python load_tests/gpu_bench_xdecoder.py --smoke        # every part on the CPU, demo model, small sizes

Rows (the network only: preprocessing and postprocessing are left out of the timings):
- `seg <precision> b<B>`: images/s of `encode_images` + the segmentation decoder pass on B 512x512
  images (official resize: 800x800 network input), and the share of the device's dense peak FLOP rate
  at 290 GFLOP per image (the FLOPs of this model and size; `--smoke` counts them instead);
- `seg bf16+compile b<B>`: the same with the image encoder compiled for that bucket (section
  `compile`, `--compile-batch`; compilation happens in the warm-up calls);
- `parity <precision>`: segmentation of the reference image(s) against fp32: binary masks of all
  queries at the original size (union IoU over the queries, logit > 0) and the argmax labels;
  passes at IoU >= 0.99 with identical labels (not applied with `--smoke`, whose model is untrained);
- `captions <precision> b<B>`: captions/s of 50-step greedy captioning at 224x224;
- `encode_texts <precision>`: seconds for a 150-class vocabulary (81 prompts each).

Each row is also appended, as soon as it is measured, as `NAME<TAB>pass|fail<TAB>DETAIL` to
`--rows` for the table of gpu_check.sh; `--json` gets every number at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.checkpoint import reference_checkpoint
from models.decoders.xdecoder import class_logits
from models.postprocess import resize_mask_logits
from models.precision import precision_context, prepare_model
from models.predictor import Predictor
from models.preprocess import batch_images, load_image

ROOT = Path(__file__).resolve().parents[1]
GFLOP_PER_IMAGE = 290.0  # Focal-T segmentation, 512x512 image at the official 800-px network size
# Dense peak TFLOP/s per precision (no sparsity): the FLOP bound of the share column.
PEAK_TFLOPS = {
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp16": 989.0},  # SXM / HBM3
    "H200": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0},
}
PARITY_IOU = 0.99
VOCABULARY = ["person", "rocket", "flag", "sky", "wall"]


def reference_dir() -> Path:
    """OPENSET_REFERENCE_DIR, then ../shared/reference, then /work/shared/reference (as tests do)."""
    candidates = [os.environ.get("OPENSET_REFERENCE_DIR"), ROOT.parent / "shared" / "reference"]
    for candidate in [Path(c) for c in candidates if c] + [Path("/work/shared/reference")]:
        if (candidate / "xdecoder_focalt").is_dir():
            return candidate
    raise FileNotFoundError("reference data folder not found (needs xdecoder_focalt/)")


def peak_tflops(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in name:
            return peaks
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.rows: list[tuple[str, str, str]] = []
        self.numbers: dict[str, dict] = {}
        self.peaks = peak_tflops(self.device)
        if args.smoke:
            self.checkpoint = None
        else:
            keys = reference_dir() / "xdecoder_focalt" / "keys.json"
            self.checkpoint = reference_checkpoint(keys, ROOT / ".cache" / "tests")
        self.predictors: dict[bool, Predictor] = {}
        if args.rows is not None:
            args.rows.parent.mkdir(parents=True, exist_ok=True)
            args.rows.write_text("")

    def predictor(self, precision: str, compile: bool = False) -> Predictor:
        """One model for every precision (its float32 islands are no-ops without autocast; the
        precision is chosen per call by `precision_context`), another one compiled."""
        if compile not in self.predictors:
            self.predictors[compile] = make_predictor(self.args.config, self.checkpoint, self.device, compile)
        return self.predictors[compile]

    def record(self, name: str, ok: bool, detail: str, numbers: dict) -> None:
        """Print a row and append it to --rows at once (a run cut short keeps its rows)."""
        status = "pass" if ok else "fail"
        self.rows.append((name, status, detail))
        self.numbers[name] = numbers
        print(f"{name:34s} {status:8s} {detail}", flush=True)
        if self.args.rows is not None:
            with self.args.rows.open("a") as f:
                f.write(f"{name}\t{status}\t{detail}\n")

    # ------------------------------------------------------------------ sections

    def segmentation(self, precision: str, batch: int, compile: bool = False) -> None:
        predictor = self.predictor(precision, compile)
        images = [self.image] * batch
        rule = predictor.model.cfg.resize["segmentation"]
        tensor = batch_images(images, rule).tensor

        def run() -> None:
            with torch.inference_mode(), precision_context(precision, self.device):
                features = predictor.model.encode_images(to_device(tensor, self.device))
                predictor.model.decoder.forward_seg(features.memory)

        seconds = timed(run, self.device, self.args.warmup + (2 if compile else 0), self.args.repeats)
        images_per_s = batch / seconds
        gflop = self.gflop_per_image
        share = ""
        numbers = {"images_per_s": images_per_s, "seconds_per_batch": seconds, "gflop_per_image": gflop}
        if self.peaks is not None:
            peak = self.peaks["bf16" if precision == "bf16" else precision]
            fraction = images_per_s * gflop / (peak * 1e3)
            share = f", {100 * fraction:.1f}% of {peak:g} TFLOP/s"
            numbers["share_of_flop_bound"] = fraction
        name = f"seg {precision}{'+compile' if compile else ''} b{batch}"
        self.record(name, True, f"{images_per_s:.2f} img/s ({gflop:.3g} GFLOP/img{share})", numbers)

    def parity(self, precision: str) -> None:
        reference, other = self.predictor("fp32"), self.predictor(precision)
        ious, same_labels = [], True
        for image in self.parity_images:
            masks_ref, labels_ref = segmentation_outputs(reference, image, "fp32")
            masks, labels = segmentation_outputs(other, image, precision)
            union = (masks_ref | masks).sum()
            ious.append(float((masks_ref & masks).sum() / union) if union > 0 else 1.0)
            same_labels &= bool(torch.equal(labels_ref, labels))
        iou = min(ious)
        ok = self.args.smoke or (iou >= PARITY_IOU and same_labels)
        note = " (smoke: untrained model, threshold not applied)" if self.args.smoke else ""
        detail = f"mask IoU {iou:.4f} (>= {PARITY_IOU}), labels {'same' if same_labels else 'DIFFER'}{note}"
        self.record(f"parity {precision}", ok, detail, {"mask_iou": iou, "same_labels": same_labels})

    def captions(self, precision: str, batch: int) -> None:
        predictor = self.predictor(precision)
        images = [self.image] * batch
        seconds = timed(lambda: caption_ids(predictor, images, precision), self.device, 1, self.args.repeats)
        self.record(
            f"captions {precision} b{batch}",
            True,
            f"{batch / seconds:.2f} captions/s (50 steps)",
            {"captions_per_s": batch / seconds},
        )

    def encode_texts(self, precision: str) -> None:
        predictor = self.predictor(precision)
        names = [f"class {i}" for i in range(self.args.classes)]

        def run() -> None:
            with torch.inference_mode(), precision_context(precision, self.device):
                predictor.model.text_encoder.encode_class_names(names, predictor.tokenizer)

        seconds = timed(run, self.device, 1, self.args.repeats)
        self.record(
            f"encode_texts {precision}",
            True,
            f"{seconds:.3f} s for {len(names)} classes ({len(names) * 81} prompts)",
            {"seconds": seconds, "classes": len(names)},
        )

    # ------------------------------------------------------------------ inputs

    def prepare_inputs(self) -> None:
        size = self.args.size
        rng = np.random.default_rng(0)
        self.image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if self.args.smoke:
            self.parity_images = [self.image]
        else:
            self.parity_images = [
                load_image(str(p)) for p in sorted(reference_dir().glob("xdecoder_focalt/case_*/*.png"))
            ]
        if self.args.smoke:  # count this model's FLOPs (the share column uses them)
            predictor = self.predictor("fp32")
            tensor = batch_images([self.image], predictor.model.cfg.resize["segmentation"]).tensor
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                features = predictor.model.encode_images(tensor.to(self.device))
                predictor.model.decoder.forward_seg(features.memory)
            self.gflop_per_image = counter.get_total_flops() / 1e9
        else:
            self.gflop_per_image = GFLOP_PER_IMAGE


def make_predictor(config: str, checkpoint: Path | None, device: torch.device, compile: bool) -> Predictor:
    """A Predictor on `device` whose model is prepared for the low precisions (models.precision)."""
    predictor = Predictor.from_config(config, checkpoint=checkpoint, device=str(device))
    prepare_model(predictor.model, "bf16", compile=compile, device=str(device))
    return predictor


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy from pinned memory (asynchronous on CUDA)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@torch.inference_mode()
def segmentation_outputs(predictor: Predictor, image: np.ndarray, precision: str) -> tuple[torch.Tensor, ...]:
    """Binary masks (Q, H, W) at the original size (logit > 0) and argmax labels (Q,) of one image."""
    batch = batch_images([image], predictor.model.cfg.resize["segmentation"])
    with precision_context(precision, predictor.device):
        features = predictor.model.encode_images(to_device(batch.tensor, predictor.device))
        head, _ = predictor.model.decoder.forward_seg(features.memory)
    text = predictor.encode_texts([*VOCABULARY, "background"]).float()
    labels = class_logits(head.embeds[0].float(), text, predictor.model.text_encoder.logit_scale).argmax(-1)
    ph, pw = batch.padded_sizes[0]
    masks = head.masks[0, :, : ph // 4, : pw // 4].float()
    logits = resize_mask_logits(masks, (ph, pw), batch.image_sizes[0], batch.original_sizes[0])
    return (logits > 0).cpu(), labels.cpu()


@torch.inference_mode()
def caption_ids(predictor: Predictor, images: list[np.ndarray], precision: str) -> torch.Tensor:
    batch = batch_images(images, predictor.model.cfg.resize["captioning"])
    with precision_context(precision, predictor.device):
        features = predictor.model.encode_images(to_device(batch.tensor, predictor.device))
        return predictor.model.greedy_caption(features, 50, early_stop=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="demo model, small sizes, CPU-sized")
    parser.add_argument("--config", default=None, help="default: xdecoder-focalt (demo with --smoke)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 512; 64 with --smoke)")
    parser.add_argument("--batches", default=None, help="segmentation batches (default 1,4,16; 1,2)")
    parser.add_argument("--precisions", default="fp32,tf32,bf16")
    parser.add_argument("--compile-batch", type=int, default=None, help="compile section (default 16; 2)")
    parser.add_argument("--caption-batches", default=None, help="default 1,16 (1 with --smoke)")
    parser.add_argument("--classes", type=int, default=None, help="encode_texts vocabulary (150; 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (5; 1)")
    parser.add_argument("--sections", default="seg,parity,captions,text", help="and/or compile")
    parser.add_argument("--rows", type=Path, default=None, help="tab-separated rows for gpu_check.sh")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    small = args.smoke
    args.config = args.config or ("demo" if small else "xdecoder-focalt")
    args.size = args.size or (64 if small else 512)
    args.batches = [int(b) for b in (args.batches or ("1,2" if small else "1,4,16")).split(",")]
    args.caption_batches = [int(b) for b in (args.caption_batches or ("1" if small else "1,16")).split(",")]
    args.classes = args.classes or (3 if small else 150)
    args.compile_batch = args.compile_batch or (2 if small else 16)
    args.repeats = args.repeats or (1 if small else 5)
    if small:
        args.warmup = 0
    precisions = args.precisions.split(",")

    sections = args.sections.split(",")
    bench = Bench(args)
    bench.prepare_inputs()
    if "seg" in sections:
        for precision in precisions:
            for batch in args.batches:
                bench.segmentation(precision, batch)
    if "compile" in sections:
        bench.segmentation("bf16", args.compile_batch, compile=True)
    if "parity" in sections:
        for precision in precisions:
            if precision != "fp32":
                bench.parity(precision)
    if "captions" in sections:
        for precision in ("fp32", "bf16"):
            for batch in args.caption_batches:
                bench.captions(precision, batch)
    if "text" in sections:
        for precision in ("fp32", "bf16"):
            bench.encode_texts(precision)

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "device": str(bench.device),
            "config": args.config,
            "size": args.size,
            "torch": torch.__version__,
        }
        if bench.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(bench.device)
        args.json.write_text(json.dumps({"info": info, "rows": bench.numbers}, indent=2))


if __name__ == "__main__":
    main()
