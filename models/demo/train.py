"""Train the embedded demo model from scratch on freshly rendered ShapesWorld images.

    train(TrainSettings(minutes=55)) -> writes models/weights/demo.safetensors (fp16) every few minutes
    and at the end.

AdamW with a linear warm-up and a cosine decay driven by progress = max(step / max_steps,
elapsed / time budget), so a run under a wall-clock budget still ends with a low learning rate.
Every batch is new (no epochs); held-out combinations never appear (see `models.demo.data`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from models.checkpoint import REBUILDABLE_BUFFERS, load_checkpoint
from models.configs import ResizeRule, get_config
from models.demo.data import ExampleStream
from models.demo.losses import recipe_losses
from models.demo.msda_grad import enable_msda_gradients
from models.demo.probes import RegionProbes
from models.demo.workers import WorkerGroup, run_in_workers
from models.language.tokenizer import ClipTokenizer
from models.predictor import DEMO_WEIGHTS
from models.xdecoder import XDecoderModel


@dataclass
class TrainSettings:
    minutes: float = 55.0  # wall-clock budget (the schedule ends when it is spent)
    max_steps: int | None = None  # or a step budget (whichever ends first)
    batch_size: int = 8
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    clip_norm: float = 1.0
    seed: int = 0
    threads: int = 1  # torch threads per worker: OpenMP threads spin badly on a busy machine
    workers: int = 1  # processes (one core each); each trains on batch_size / workers images a step
    save_every_s: float = 180.0
    out: Path | None = DEMO_WEIGHTS  # None: do not write weights
    init: Path | None = None  # start from these weights instead of a fresh initialisation
    log_every: int = 10


def training_rule(model: XDecoderModel) -> ResizeRule:
    """The resize of the training images: one image serves every task, so the config's tasks must
    share one rule."""
    rules = set(model.cfg.resize.values())
    if len(rules) != 1:
        raise ValueError(f"demo training needs one resize rule for every task, the config has {rules}")
    return rules.pop()


def save_weights(model: XDecoderModel, path: Path) -> None:
    """The state dict as fp16 safetensors (loaded back as fp32), written atomically."""
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
        if k not in REBUILDABLE_BUFFERS
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "config": model.cfg.name})
    tmp.replace(path)


def init_projections(model: XDecoderModel) -> None:
    """The joint-space projections start at zero in the module (they are always loaded); training
    from scratch needs them random, or the normalised embeddings have no direction to learn from."""
    for p in (model.backbone_proj, model.decoder.class_embed, model.decoder.caping_embed):
        nn.init.normal_(p, std=p.shape[0] ** -0.5)


def build_optimizer(
    model: XDecoderModel, settings: TrainSettings, probes: RegionProbes
) -> torch.optim.Optimizer:
    """AdamW over the model and the training-only probes; no weight decay on biases, norms,
    embeddings and other 0/1-d parameters."""
    decay, plain = [], []
    named = [*model.named_parameters(), *probes.named_parameters(prefix="probes")]
    for name, p in named:
        no_decay_name = "embedding" in name or "embed." in name or name.endswith(("level_embed", "pos_embed"))
        if p.ndim < 2 or no_decay_name:
            plain.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": settings.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    # fused: one kernel over all parameters (5 ms a step on CPU against 45 ms for the per-tensor loop)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), fused=True)


def learning_rate(settings: TrainSettings, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / settings.warmup_steps)
    return settings.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def train(settings: TrainSettings, log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Run the recipe; returns the logged history (one dict per logged step).

    With `settings.workers > 1` the steps are shared by that many processes (`models.demo.workers`);
    otherwise the recipe runs here, in `settings.threads` torch threads, and the caller's thread count
    is restored afterwards.
    """
    if settings.batch_size % settings.workers:
        raise ValueError(f"batch size {settings.batch_size} does not split over {settings.workers} workers")
    if settings.workers > 1:
        return run_in_workers(settings, log, run_recipe, settings.workers)
    previous_threads = torch.get_num_threads()
    try:
        return run_recipe(settings, log, WorkerGroup())
    finally:
        torch.set_num_threads(previous_threads)


def run_recipe(
    settings: TrainSettings, log: Callable[[str], None], group: WorkerGroup
) -> list[dict[str, float]]:
    """The training loop of `train`, in one process of `group`: its share of every batch, gradients
    averaged over the group, and only the leading process logs and writes weights."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    enable_msda_gradients()
    model = XDecoderModel(get_config("demo"))
    if settings.init is not None:
        load_checkpoint(model, settings.init)
    else:
        init_projections(model)
    model.train()
    probes = RegionProbes.for_model(model.cfg)
    tokenizer = ClipTokenizer()
    optimizer = build_optimizer(model, settings, probes)
    params = [p for p in (*model.parameters(), *probes.parameters()) if p.requires_grad]
    group.share_parameters(params)
    # Rank 0 draws the images a single process would; the others draw their own.
    rng = np.random.default_rng(settings.seed if group.leads else [settings.seed, group.rank])
    stream = ExampleStream(rng, training_rule(model), settings.batch_size // group.size)
    budget = settings.minutes * 60.0
    start = last_save = time.monotonic()
    history: list[dict[str, float]] = []
    step = 0
    while True:
        elapsed = time.monotonic() - start
        progress = elapsed / budget
        if settings.max_steps is not None:
            progress = max(progress, step / settings.max_steps)
        progress = group.agree(progress)
        if progress >= 1.0:
            break
        lr = learning_rate(settings, step, progress)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        losses = recipe_losses(model, probes, tokenizer, stream.next_batch(), rng)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        group.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        step += 1
        if group.leads and (step % settings.log_every == 0 or step == 1):
            row = {k: float(v.detach()) for k, v in losses.items()} | {
                "step": step,
                "lr": lr,
                "elapsed_s": elapsed,
            }
            history.append(row)
            parts = " ".join(f"{k} {v:.3f}" for k, v in row.items() if k in losses)
            log(f"step {step} t {elapsed:.0f}s lr {lr:.2e} {parts}")
        if group.leads and settings.out is not None and time.monotonic() - last_save > settings.save_every_s:
            save_weights(model, settings.out)
            last_save = time.monotonic()
    group.check_parameters_agree(params)
    if group.leads and settings.out is not None:
        save_weights(model, settings.out)
        log(f"wrote {settings.out} after {step} steps, {time.monotonic() - start:.0f}s")
    return history
