"""Plot helpers for experiments/train.py: solver convergence and learning curves.

matplotlib is optional (``pip install -e ".[plot]"``): without it every function
prints one line saying so and returns ``None``. Figures are written with the
Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import torch


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_convergence(traces: Mapping[str, torch.Tensor], path: str | Path, *, tol: float | None = None,
                     title: str = "DEQ solver convergence") -> Path | None:
    """Residual against iteration, one curve (median) and band (min..max over the batch) per solve.

    Args:
        traces: label -> ``(n_iter, B)`` residual trace (``SolverResult.trace``).
        path: the PNG to write.
        tol: draw the tolerance as a horizontal line.
        title: figure title.

    Returns:
        ``path`` as a ``Path``, or ``None`` when matplotlib is missing or there
        is nothing to plot.
    """
    plt = _pyplot()
    if plt is None:
        print(f"matplotlib is not installed: skipping {path} (pip install matplotlib)")
        return None
    traces = {k: v for k, v in traces.items() if v is not None and v.numel()}
    if not traces:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, trace in traces.items():
        t = trace.detach().double().cpu()
        it = range(1, t.shape[0] + 1)
        # Residuals may be exactly 0 (a fixed point hit); a log axis needs a floor.
        t = t.clamp_min(1e-16)
        ax.plot(it, t.median(dim=1).values, label=f"{label} (median)")
        ax.fill_between(it, t.min(dim=1).values, t.max(dim=1).values, alpha=0.2)
    if tol is not None:
        ax.axhline(tol, color="k", linestyle="--", linewidth=1, label=f"tol {tol:g}")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("residual")
    ax.set_title(title)
    return _save(fig, ax, path)


def plot_learning_curves(records: Sequence[dict], path: str | Path, *,
                         title: str = "learning curves") -> Path | None:
    """Training and validation loss against step from ``metrics.jsonl`` records, one line per run and split.

    Args:
        records: the parsed lines (``kind`` ``train`` / ``valid``, ``run``, ``step``, ``loss``).
        path: the PNG to write.
        title: figure title.

    Returns:
        ``path`` as a ``Path``, or ``None`` when matplotlib is missing or there is nothing to plot.
    """
    plt = _pyplot()
    if plt is None:
        print(f"matplotlib is not installed: skipping {path} (pip install matplotlib)")
        return None
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for rec in records:
        if rec.get("kind") in ("train", "valid") and isinstance(rec.get("loss"), (int, float)):
            if math.isfinite(rec["loss"]):
                series.setdefault((rec.get("run", "run"), rec["kind"]), []).append((rec["step"], rec["loss"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (run, kind), points in sorted(series.items()):
        points.sort()
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="o" if kind == "valid" else None, markersize=3,
                linestyle="-" if kind == "train" else "--", label=f"{run} {kind}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean NLL, nats)")
    ax.set_title(title)
    return _save(fig, ax, path)


def _save(fig, ax, path: str | Path) -> Path:
    """Legend, layout, PNG at 120 dpi; the figure is closed."""
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path
