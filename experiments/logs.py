"""What a run records: ``metrics.jsonl`` always, TensorBoard optionally, and a progress line.

Every record is a flat dict with ``kind`` (``train``, ``valid``, ``test``,
``nonfinite``) and ``step``; :class:`MetricsLog` writes it as one JSON line
(rank 0 only, flushed per line) and :class:`TensorBoard` as scalars
``<kind>/<key>``. Human-readable lines go through :mod:`logging` (so Hydra's
``train.log`` holds them): one per log interval and evaluation. The tqdm bar
(:class:`Progress`) is drawn only where its stream is a terminal; elsewhere
(a pipe, a batch job's log file) the per-interval log line is all there is.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Iterator

import deq

from .checkpoint import atomic_write


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, each tagged with the run's name."""

    def __init__(self, path: Path, run: str):
        self.path, self.run = path, run

    def write(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"run": self.run, **record}, allow_nan=True) + "\n")

    def truncate(self, step: int | None) -> None:
        """Forget this run's lines after ``step`` (all of them for ``None``), and any line cut by a kill."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if rec.get("run") == self.run and (step is None or rec.get("step", 0) > step):
                continue
            keep.append(line)
        atomic_write(self.path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))

    def close(self) -> None:
        """Nothing to close: every line is written and closed at once."""


class TensorBoard:
    """TensorBoard scalars ``<kind>/<key>`` of every numeric field (``logger=tensorboard``).

    Args:
        log_dir: the event files' directory (the loop passes ``<out_dir>/tensorboard/<run>``).
        purge_step: on resume, the first step not in the checkpoint: TensorBoard
            hides events from the interrupted process at or after it.
        flush_secs: how often the writer flushes.

    Raises:
        ImportError: the ``tensorboard`` package is missing (``pip install -e ".[tensorboard]"``).
    """

    def __init__(self, *, log_dir: str | Path, purge_step: int | None = None, flush_secs: int = 30):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=flush_secs)

    def write(self, record: dict) -> None:
        kind, step = record["kind"], record["step"]
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    """All parseable lines of a ``metrics.jsonl``."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def solver_stats(result: deq.SolverResult | None) -> dict[str, float]:
    """Forward (and, after ``backward()``, backward) solver statistics of one layer call."""
    if result is None:
        return {}
    s = result.summary()
    stats = {"fwd_nstep": s["nstep_mean"], "fwd_residual": s["residual_mean"], "fwd_residual_max": s["residual_max"],
             "fwd_converged": s["converged_frac"]}
    if result.backward is not None:
        b = result.backward.summary()
        stats.update(bwd_nstep=b["nstep_mean"], bwd_residual=b["residual_mean"], bwd_residual_max=b["residual_max"],
                     bwd_converged=b["converged_frac"])
    return stats


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def train_line(run: str, rec: dict) -> str:
    """The human line of a ``train`` record."""
    parts = [f"[{run}] step {rec['step']}", f"loss {rec['loss']:.4f}", f"ppl {_ppl(rec['loss']):.2f}",
             f"lr {rec['lr']:.3g}", rec["mode"]]
    if "fwd_nstep" in rec:
        parts.append(f"fwd {rec['fwd_nstep']:.1f}it r={rec['fwd_residual']:.1e}")
    if "bwd_nstep" in rec:
        parts.append(f"bwd {rec['bwd_nstep']:.1f}it r={rec['bwd_residual']:.1e}")
    if "jac_loss" in rec:
        parts.append(f"jac {rec['jac_loss']:.4f} x{rec['jac_weight']:g} ({rec['jac_steps']} steps)")
    if rec.get("skipped"):
        parts.append(f"{rec['skipped']} skipped")
    parts.append(f"{rec['step_time_s'] * 1e3:.0f} ms/step")
    return " | ".join(parts)


def eval_line(run: str, rec: dict, summary: str) -> str:
    """The human line of a ``valid`` / ``test`` record (``summary`` from the task)."""
    return (f"[{run}] step {rec['step']} {rec['kind']}: loss {rec['loss']:.4f} | {summary} | {rec['mode']} "
            f"{rec['fwd_nstep']:.1f}it residual {rec['fwd_residual']:.1e}")


class Progress:
    """A tqdm bar on stderr when it is a terminal and ``enabled``; otherwise nothing (the log lines remain).

    Use as a context manager: while the bar is shown, console log lines are
    routed through it so they do not break it.
    """

    def __init__(self, *, total: int, initial: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0.5, unit="step")

    @contextlib.contextmanager
    def shown(self) -> Iterator["Progress"]:
        if self.bar is None:
            yield self
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm():
                yield self
        finally:
            self.bar.close()

    def update(self, loss: float, stats: dict[str, float], jac_loss: float | None, step_time: float) -> None:
        if self.bar is None:
            return
        parts = [f"loss {loss:.3f}"]
        if "fwd_nstep" in stats:
            parts.append(f"fwd {stats['fwd_nstep']:.1f}it r={stats['fwd_residual']:.1e}")
        if "bwd_nstep" in stats:
            parts.append(f"bwd {stats['bwd_nstep']:.1f}it")
        if jac_loss is not None:
            parts.append(f"jac {jac_loss:.3f}")
        parts.append(f"{step_time * 1e3:.0f}ms")
        self.bar.set_postfix_str(" | ".join(parts), refresh=False)
        self.bar.update(1)
