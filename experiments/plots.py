"""The two figures of a run: learning curves and solver convergence.

Figures are drawn on :class:`matplotlib.figure.Figure` objects, not through
``pyplot``: no display is needed and importing this module changes no global
matplotlib state (a notebook keeps its backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_learning_curves(records: Sequence[dict], path: str | Path, *, switch_steps: Mapping[str, int] | None = None,
                         title: str = "learning curves") -> Path | None:
    """Training and validation loss against step from ``metrics.jsonl`` records; one colour per run.

    Training loss is a solid line, validation a dashed line with markers, both
    in the run's colour; a dotted vertical line in the same colour marks where
    the run switched from unrolled training to the DEQ.

    Args:
        records: the parsed lines (``kind`` ``train`` / ``valid``, ``run``, ``step``, ``loss``).
        path: the PNG to write.
        switch_steps: run -> the step of its unrolled -> DEQ switch.
        title: figure title.

    Returns:
        ``path`` as a ``Path``, or ``None`` when there is nothing to plot.
    """
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for rec in records:
        loss = rec.get("loss")
        if rec.get("kind") in ("train", "valid") and isinstance(loss, (int, float)) and math.isfinite(loss):
            series.setdefault(rec.get("run", "run"), {}).setdefault(rec["kind"], []).append((rec["step"], loss))
    if not series:
        return None
    switch_steps = switch_steps or {}
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, kinds) in enumerate(sorted(series.items())):
        colour = colours[i % len(colours)]
        for kind, points in sorted(kinds.items()):
            steps, losses = zip(*sorted(points))
            valid = kind == "valid"
            ax.plot(steps, losses, color=colour, linestyle="--" if valid else "-", marker="o" if valid else None,
                    markersize=3, label=f"{run} {kind}")
        if run in switch_steps:
            ax.axvline(switch_steps[run], color=colour, linestyle=":", linewidth=1,
                       label=f"{run}: unrolled -> DEQ (step {switch_steps[run]})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean NLL, nats)")
    ax.set_title(title)
    return _save(fig, ax, path)


def stack_traces(traces: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n_iter_i + 1, B_i)`` residual traces as one ``(max n_iter + 1, sum B_i)`` tensor.

    A shorter trace repeats its last row (a solve that stopped keeps its last
    residual, as a converged sample does within one trace).
    """
    length = max(t.shape[0] for t in traces)
    padded = [torch.cat([t, t[-1:].expand(length - t.shape[0], -1)]) if t.shape[0] < length else t
              for t in (t.detach().double().cpu().reshape(t.shape[0], -1) for t in traces)]
    return torch.cat(padded, dim=1)


def plot_convergence(solves: Mapping[str, Sequence[torch.Tensor]], path: str | Path, *, tol: float | None = None,
                     title: str = "DEQ solver convergence") -> Path | None:
    """Residual against iteration: the median and the 10-90% band over every sample of every solve given.

    Args:
        solves: label -> the residual traces of many solves (``SolverResult.trace``,
            ``(n_iter + 1, B)``, row 0 the initial guess), e.g. every batch of a
            whole evaluation, or the backward solves of the last training steps.
        path: the PNG to write.
        tol: draw the tolerance as a horizontal line.
        title: figure title.

    Returns:
        ``path`` as a ``Path``, or ``None`` when there is nothing to plot.
    """
    solves = {k: [t for t in v if t is not None and t.numel()] for k, v in solves.items()}
    solves = {k: v for k, v in solves.items() if v}
    if not solves:
        return None
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for i, (label, traces) in enumerate(solves.items()):
        # Residuals may be exactly 0 (a fixed point hit); a log axis needs a floor.
        t = stack_traces(traces).clamp_min(1e-16)
        it = range(t.shape[0])
        low, mid, high = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=t.dtype), dim=1)
        line, = ax.plot(it, mid, linestyle=("-", "--", "-.", ":")[i % 4],
                        label=f"{label}: median of {t.shape[1]} samples, {len(traces)} solves")
        ax.fill_between(it, low, high, color=line.get_color(), alpha=0.2)
    if tol is not None:
        ax.axhline(tol, color="k", linestyle="--", linewidth=1, label=f"tol {tol:g}")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration (0: initial guess)")
    ax.set_ylabel("residual (band: 10-90% of samples)")
    ax.set_title(title)
    return _save(fig, ax, path)


def _save(fig: Figure, ax, path: str | Path) -> Path:
    """Legend, layout, PNG at 120 dpi."""
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
