"""Learning-rate schedules, built by ``_target_`` from ``configs/schedule``.

A schedule maps the step about to run (``step`` = the number of steps already
taken, from 0) and the optimizer's configured learning rate ``base_lr`` to the
learning rate of that step: :meth:`lr` is a pure function of them and of the
schedule's own state (only :class:`Plateau` has one). The loop sets
``group["lr"] = schedule.lr(step, base_lr)`` before every step, with
``base_lr`` taken from the config of *this* process, so a resumed run with
another ``optim.optimizer.lr`` trains at exactly the schedule of the new
value (it never multiplies by a learning rate stored in a checkpoint).

Linear warmup (every schedule but :class:`Plateau`): ``base_lr * max(step, 1)
/ warmup_steps`` for ``step < warmup_steps``. From step 1 on this is the
DEQ-Transformer code's warmup (``lr * train_step / warmup_step``, set after
each step: locuslab/deq ``DEQ-Sequence/train_transformer.py``); its very first
step runs at the full ``lr``, because the warmup value is only set after a
step, and we run it at ``base_lr / warmup_steps`` instead.
"""

from __future__ import annotations

import dataclasses
import math


def _check(name: str, value, *, minimum: float, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ValueError(f"schedule.{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum:
        raise ValueError(f"schedule.{name} must be >= {minimum}, got {value!r}")


def _warmup(step: int, warmup_steps: int) -> float:
    return max(step, 1) / warmup_steps


class _Stateless:
    """No state: the learning rate depends on the step only."""

    def observe(self, valid_loss: float) -> None:
        """Nothing: only :class:`Plateau` reacts to evaluations."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got {sorted(state)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Constant(_Stateless):
    """``base_lr``, after ``warmup_steps`` of linear warmup."""

    warmup_steps: int = 0

    def __post_init__(self):
        _check("warmup_steps", self.warmup_steps, minimum=0, integer=True)

    def lr(self, step: int, base_lr: float) -> float:
        if step < self.warmup_steps:
            return base_lr * _warmup(step, self.warmup_steps)
        return base_lr


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cosine(_Stateless):
    """Cosine annealing over steps ``0 .. max_steps``, linear warmup overriding it for the first steps.

    ``lr = eta_min + (base_lr - eta_min) (1 + cos(pi s / max_steps)) / 2`` for
    ``warmup_steps <= s <= max_steps`` (``eta_min`` after), the warmup below:
    the DEQ-Transformer recipe exactly (``CosineAnnealingLR(T_max=max_step)``
    stepped with the global step after the warmup; locuslab/deq
    ``DEQ-Sequence/train_transformer.py``). The cosine's phase counts from step
    0, so at the end of the warmup it has already moved: compare
    :class:`WarmupCosine`.
    """

    warmup_steps: int = 0
    max_steps: int
    eta_min: float = 0.0

    def __post_init__(self):
        _check("warmup_steps", self.warmup_steps, minimum=0, integer=True)
        _check("max_steps", self.max_steps, minimum=1, integer=True)
        _check("eta_min", self.eta_min, minimum=0.0)

    def lr(self, step: int, base_lr: float) -> float:
        if step < self.warmup_steps:
            return base_lr * _warmup(step, self.warmup_steps)
        return self.eta_min + (base_lr - self.eta_min) * 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))

    def _progress(self, step: int) -> float:
        """The cosine's phase in ``[0, 1]`` at ``step`` (past the warmup)."""
        return min(step, self.max_steps) / self.max_steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmupCosine(Cosine):
    """Linear warmup, then a cosine from ``base_lr`` at the end of the warmup to ``eta_min`` at ``max_steps``.

    ``lr = eta_min + (base_lr - eta_min) (1 + cos(pi p)) / 2`` with
    ``p = (s - warmup_steps) / (max_steps - warmup_steps)`` (``eta_min`` after
    ``max_steps``). Against :class:`Cosine` with the WikiText-103 recipe's
    16k / 300k steps, its learning rate is 1.034x at step 50k, 1.088x at 150k
    and 1.116x near the end.
    """

    def _progress(self, step: int) -> float:
        return min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))


@dataclasses.dataclass(kw_only=True)
class Plateau:
    """Divide the learning rate by ``1 / factor`` when the validation loss stops improving.

    After each evaluation: a loss below the best so far resets the count of bad
    evaluations, anything else adds one; more than ``patience`` bad ones in a
    row cut the rate (``lr = max(base_lr * factor ** cuts, min_lr)``) and reset
    the count. This is :class:`torch.optim.lr_scheduler.ReduceLROnPlateau`
    with ``mode="min"``, ``threshold=0``, ``cooldown=0``, written as a function
    of ``base_lr`` so that a changed learning rate applies on resume.

    Attributes:
        best, bad_evals, cuts: the state (checkpointed).
    """

    factor: float = 0.1
    patience: int = 0
    min_lr: float = 0.0
    best: float = dataclasses.field(default=math.inf, init=False)
    bad_evals: int = dataclasses.field(default=0, init=False)
    cuts: int = dataclasses.field(default=0, init=False)

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not 0 < self.factor < 1:
            raise ValueError(f"schedule.factor must be in (0, 1), got {self.factor!r}")
        _check("patience", self.patience, minimum=0, integer=True)
        _check("min_lr", self.min_lr, minimum=0.0)

    def lr(self, step: int, base_lr: float) -> float:
        return max(base_lr * self.factor ** self.cuts, self.min_lr)

    def observe(self, valid_loss: float) -> None:
        if not math.isfinite(valid_loss):
            return
        if valid_loss < self.best:
            self.best, self.bad_evals = valid_loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.patience:
            self.cuts += 1
            self.bad_evals = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals, "cuts": self.cuts}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals, self.cuts = float(state["best"]), int(state["bad_evals"]), int(state["cuts"])
