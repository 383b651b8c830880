"""Evaluation of a whole split: the task's batches in order, memory carried, metrics over all ranks."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .distributed import DistInfo, all_reduce
from .logs import solver_stats
from .state import Window
from .step import autocast
from .tasks import Task


@dataclasses.dataclass
class Evaluation:
    """Metrics of one split, and the forward residual traces of its solves.

    Attributes:
        metrics: the task's metrics (``loss``, ``ppl``, ``n_tokens``, ``acc`` for copy
            memory) and the forward solver's ``fwd_nstep``, ``fwd_residual``,
            ``fwd_converged`` (means over batches) and ``fwd_residual_max``; ``partial``
            when ``max_batches`` stopped it early.
        traces: with ``keep_traces``, this rank's ``(n_iter + 1, B)`` residual
            trace of every batch (for the convergence plot); else empty.
    """

    metrics: dict
    traces: list[Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, split: str, *, precision: str, info: DistInfo, device: torch.device,
             mem_len: int | None = None, max_batches: int | None = None, keep_traces: bool = False) -> Evaluation:
    """The metrics of ``split`` with the layer in eval mode (its eval budget), over all ranks.

    The RNG is forked: evaluating never moves the training RNG, so a run that
    evaluates (or stops and resumes) at step k draws the same dropout masks
    afterwards as one that does not.

    Args:
        model: the language model (its ``deq.last_result`` is read after each batch).
        task: gives the batches and the metrics.
        split: ``"valid"`` or ``"test"``.
        precision: as in training.
        info, device: the job and this process's device.
        mem_len: the Transformer's evaluation memory length (``None``: the model's).
        max_batches: stop after this many batches (quick checks).
        keep_traces: keep every batch's forward residual trace.
    """
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    stats, traces, n_batches, partial = Window(), [], 0, False
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            mems = None
            for x, y in task.eval_batches(split):
                if max_batches is not None and n_batches >= max_batches:
                    partial = True
                    break
                with autocast(precision, device):
                    sums, mems = task.score(model, x, y, mems=mems, mem_len=mem_len)
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
                result = model.deq.last_result
                stats.add(solver_stats(result))
                if keep_traces:
                    traces.append(result.trace.detach().float().cpu())
                n_batches += 1
    finally:
        model.train(was_training)
    metrics = task.metrics(dict(zip(sorted(totals), all_reduce([totals[k] for k in sorted(totals)], info, device))))
    metrics.update(_reduced_stats(stats, info, device))
    if partial:
        metrics["partial"] = True
    return Evaluation(metrics=metrics, traces=traces)


def _reduced_stats(stats: Window, info: DistInfo, device: torch.device) -> dict[str, float]:
    """Means over the batches of every rank, and the maximum of the ``_max`` keys."""
    keys = sorted(stats.sums)
    summed = all_reduce([stats.sums[k] for k in keys] + [stats.counts[k] for k in keys], info, device)
    out = {k: summed[i] / summed[len(keys) + i] for i, k in enumerate(keys)}
    maxed = sorted(stats.maxima)
    out.update(zip(maxed, all_reduce([stats.maxima[k] for k in maxed], info, device, op="max")))
    return out
