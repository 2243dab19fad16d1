"""Data-parallel training on several CPU cores: one process per core, each with its own model copy.

Each training step every worker renders and trains on its share of the batch (`batch_size / workers`
images), the gradients are averaged over the workers (gloo all-reduce), and every worker takes the
same optimizer step, so the copies stay identical. The first worker (rank 0) decides when the budget
is spent, writes the weights and reports the log lines and the history back to the caller.

    history = run_in_workers(settings, log, recipe, workers)   # recipe(settings, log, group) in each

The demo model's steps are many short operations, so a second torch thread in one process adds
almost nothing; two processes with half the batch each took about 1.1 s a step on a 2-core machine,
where one process with the whole batch took 1.45 s.
"""

from __future__ import annotations

import queue
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


@dataclass(frozen=True)
class WorkerGroup:
    """Where a training process stands among the workers of one run."""

    rank: int = 0
    size: int = 1

    @property
    def leads(self) -> bool:
        """Whether this process logs, saves and decides when the run ends."""
        return self.rank == 0

    def share_parameters(self, params: list[nn.Parameter]) -> None:
        """Give every worker rank 0's parameter values (the copies start identical)."""
        if self.size == 1:
            return
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over the workers (one all-reduce of one flat
        buffer); a parameter without a gradient counts as a zero gradient."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    def check_parameters_agree(self, params: list[nn.Parameter]) -> None:
        """Raise if the workers' copies have drifted apart (a float64 sum and sum of squares of all
        parameters, compared exactly: identical steps give identical bits)."""
        if self.size == 1:
            return
        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        digest = torch.stack((flat.sum(), flat.square().sum()))
        digests = [torch.empty_like(digest) for _ in range(self.size)]
        dist.all_gather(digests, digest)
        if any(not torch.equal(d, digests[0]) for d in digests):
            raise RuntimeError(f"the workers' model copies differ: {[d.tolist() for d in digests]}")

    def agree(self, value: float) -> float:
        """Rank 0's value, on every worker (the schedule's progress, so that all stop at one step)."""
        if self.size == 1:
            return value
        shared = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(shared, src=0)
        return float(shared.item())


Recipe = Callable[[Any, Callable[[str], None], WorkerGroup], list[dict[str, float]]]


def run_in_workers(
    settings: Any, log: Callable[[str], None], recipe: Recipe, workers: int
) -> list[dict[str, float]]:
    """Run `recipe` in `workers` spawned processes; returns rank 0's history. Log lines of rank 0 are
    passed to `log` here, as they come. A worker that fails stops the run with its traceback."""
    context = mp.get_context("spawn")
    messages = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = f"file://{Path(tmp) / 'rendezvous'}"
        processes = [
            context.Process(target=_worker, args=(rank, workers, rendezvous, settings, recipe, messages))
            for rank in range(workers)
        ]
        for process in processes:
            process.start()
        history: list[dict[str, float]] | None = None
        failure: str | None = None
        try:
            while history is None and failure is None:
                try:
                    kind, payload = messages.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in processes if p.exitcode not in (None, 0)]
                    if dead:
                        failure = _last_error(messages) or f"a worker exited with code {dead[0].exitcode}"
                    continue
                if kind == "log":
                    log(payload)
                elif kind == "history":
                    history = payload
                else:
                    failure = payload
        finally:
            for process in processes:
                if failure is not None:
                    process.terminate()
                process.join()
    if failure is not None:
        raise RuntimeError(f"data-parallel training failed:\n{failure}")
    assert history is not None
    return history


def _last_error(messages: Any) -> str | None:
    """The error report among the messages still queued, if a worker sent one before it died."""
    error = None
    try:
        while True:
            kind, payload = messages.get(timeout=1.0)
            if kind == "error":
                error = payload
    except queue.Empty:
        return error


def _worker(rank: int, size: int, rendezvous: str, settings: Any, recipe: Recipe, messages: Any) -> None:
    """One training process: join the group, run the recipe, send rank 0's results back."""
    try:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=size)
        group = WorkerGroup(rank, size)
        history = recipe(settings, lambda line: messages.put(("log", line)), group)
        dist.barrier()
        if group.leads:
            messages.put(("history", history))
    except Exception:
        messages.put(("error", f"worker {rank}:\n{traceback.format_exc()}"))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
