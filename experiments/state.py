"""The typed training state: everything besides the model and the optimizer that the next step depends on.

:class:`TrainState` is saved and restored as one object (:meth:`TrainState.to_dict`,
:meth:`TrainState.from_dict`): the step, the data position, the carried memory,
the non-finite counters, the accumulators of the current log interval, the
random draws of the step plan and the RNG states of this process. Everything
it stores is a tensor or a plain Python value, so a checkpoint loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass
class Window:
    """Accumulators of the current log interval (checkpointed: an interval that spans a resume stays whole).

    Attributes:
        steps, skipped: steps taken, and the skipped (non-finite) ones among them.
        nll, tokens: summed training NLL and target tokens of the good steps (all ranks).
        time_s: time spent in those steps.
        sums, counts, maxima: per-key statistics of the good steps (see :meth:`add`).
    """

    steps: int = 0
    skipped: int = 0
    nll: float = 0.0
    tokens: int = 0
    time_s: float = 0.0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    maxima: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, stats: dict[str, float]) -> None:
        """Add one step's statistics: keys ending in ``_max`` keep their maximum, the others their mean."""
        for key, value in stats.items():
            if key.endswith("_max"):
                self.maxima[key] = max(self.maxima.get(key, -math.inf), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def summary(self) -> dict[str, float]:
        """Means (over the steps that had the key) and maxima of the statistics."""
        out: dict[str, float] = {k: self.sums[k] / self.counts[k] for k in sorted(self.sums)}
        out.update((k, self.maxima[k]) for k in sorted(self.maxima))
        return out

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan


@dataclasses.dataclass
class TrainState:
    """Where a run stands after ``step`` steps.

    Attributes:
        step: optimizer steps taken, the skipped ones included.
        batch: training batches consumed (the data position, ``Task.train_batch`` index).
        epoch: the pass over the training data of the last batch.
        mems: this rank's memory carried into the next batch (``None``: start afresh).
        nonfinite_total, nonfinite_streak: skipped non-finite steps, in all and in a row now.
        overflow_skips: fp16 steps skipped by the gradient scaler (not part of the streak).
        checkpoint_step: the step of the newest checkpoint written, ``None`` before the first.
        elapsed_s: time spent training and evaluating, over every process of the run.
        window: the current log interval.
        train_loss: mean training NLL of the last complete log interval.
        valid: metrics of the last validation.
        final: ``{"valid": ..., "test": ...}`` once the run has finished.
        draws: the generator of the per-step plan (Jacobian regularisation, solver budget),
            seeded alike on every rank.
    """

    step: int = 0
    batch: int = 0
    epoch: int = 0
    mems: Any = None
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    overflow_skips: int = 0
    checkpoint_step: int | None = None
    elapsed_s: float = 0.0
    window: Window = dataclasses.field(default_factory=Window)
    train_loss: float = math.nan
    valid: dict | None = None
    final: dict | None = None
    draws: torch.Generator = dataclasses.field(default_factory=torch.Generator)

    @classmethod
    def fresh(cls, seed: int) -> "TrainState":
        return cls(draws=torch.Generator().manual_seed(seed))

    def to_dict(self) -> dict:
        """The shared part (equal on every rank): everything but ``mems`` and the RNG (:func:`rank_state`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "mems"}
        out["window"] = dataclasses.asdict(self.window)
        out["draws"] = self.draws.get_state()
        return out

    @classmethod
    def from_dict(cls, shared: dict, mems: Any) -> "TrainState":
        fields = dict(shared)
        fields["window"] = Window(**fields["window"])
        draws = torch.Generator()
        draws.set_state(fields.pop("draws"))
        return cls(**fields, mems=mems, draws=draws)


def rank_state(state: TrainState, device: torch.device) -> dict:
    """This rank's part of a checkpoint: its carried memory and its RNG states, on the CPU."""
    return {"mems": to_cpu(state.mems), "rng": capture_rng(device)}


def capture_rng(device: torch.device) -> dict:
    """The RNG states a training step can draw from, as checkpoint-safe values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # uint32 keys as int64: loadable with weights_only on every torch version.
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng(rng: dict, device: torch.device) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def to_cpu(obj: Any) -> Any:
    """Tensors (in tuples, lists, dicts) moved to the CPU; named tuples become plain tuples."""
    if isinstance(obj, torch.Tensor):
        # clone: a view (e.g. the last mem_len positions) would otherwise save its whole storage
        return obj.detach().cpu().clone()
    if isinstance(obj, (tuple, list)):
        return (list if type(obj) is list else tuple)(to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Inverse of :func:`to_cpu` for the carried memory."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
