"""experiments.schedules against independent references: torch's CosineAnnealingLR stepped as
the DEQ-Transformer code steps it, and torch's ReduceLROnPlateau."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.schedules import Constant, Cosine, Plateau, WarmupCosine


def _original_lrs(base_lr: float, warmup: int, max_step: int, eta_min: float, steps: int) -> list[float]:
    """The lr each step ran at in locuslab/deq DEQ-Sequence/train_transformer.py (step 0 excepted)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max_step, eta_min=eta_min)
    used = []
    for train_step in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        train_step += 1
        if train_step < warmup:
            optimizer.param_groups[0]["lr"] = base_lr * train_step / warmup
        else:
            with pytest.warns(UserWarning):  # torch deprecates step(epoch); the original calls it so
                scheduler.step(train_step)
    return used


def test_cosine_is_the_original_schedule():
    expected = _original_lrs(2.5e-4, 16, 300, 1e-6, 300)
    ours = [Cosine(warmup_steps=16, max_steps=300, eta_min=1e-6).lr(s, 2.5e-4) for s in range(300)]
    # Step 0 runs at the full lr in the original (its warmup value is only set after a step): not copied.
    assert ours[0] == pytest.approx(2.5e-4 / 16) and expected[0] == 2.5e-4
    assert ours[1:] == pytest.approx(expected[1:], rel=1e-12, abs=0)


def test_warmup_cosine_against_the_original_at_the_recipe_sizes():
    # The lr ratio the issue measured (WikiText-103: warmup 16k, 300k steps): 1.034 at 50k,
    # 1.088 at 150k, 1.116 near the end.
    original = Cosine(warmup_steps=16000, max_steps=300000)
    ours = WarmupCosine(warmup_steps=16000, max_steps=300000)
    ratio = lambda s: ours.lr(s, 1.0) / original.lr(s, 1.0)  # noqa: E731
    assert (round(ratio(50000), 3), round(ratio(150000), 3), round(ratio(299999), 3)) == (1.034, 1.088, 1.116)
    assert ours.lr(16000, 1.0) == 1.0 and original.lr(16000, 1.0) < 1.0
    assert ours.lr(300000, 1.0) == original.lr(300000, 1.0) == 0.0 == ours.lr(400000, 1.0)


def test_constant_with_warmup():
    sched = Constant(warmup_steps=4)
    assert [sched.lr(s, 2.0) for s in range(6)] == [0.5, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert Constant().lr(0, 3.0) == 3.0


def test_plateau_equals_torch_reduce_on_plateau():
    losses = [5.0, 4.0, 4.0, 4.5, 3.0, 3.0, 3.0, 3.1, 2.0, 2.5, 2.5, 2.5, 2.5, 2.5]
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1,
                                                           threshold=0.0, min_lr=0.1)
    ours = Plateau(factor=0.5, patience=1, min_lr=0.1)
    for loss in losses:
        reference.step(loss)
        ours.observe(loss)
        assert ours.lr(0, 1.0) == pytest.approx(optimizer.param_groups[0]["lr"])
    assert ours.cuts >= 3
    restored = Plateau(factor=0.5, patience=1, min_lr=0.1)
    restored.load_state_dict(ours.state_dict())
    assert restored.lr(0, 1.0) == ours.lr(0, 1.0) and restored.lr(0, 2.0) == pytest.approx(2 * 0.5 ** ours.cuts)


def test_plateau_ignores_non_finite_losses():
    sched = Plateau(factor=0.5, patience=0)
    sched.observe(math.nan)
    assert sched.cuts == 0 and sched.best == math.inf


@pytest.mark.parametrize("make, message", [
    (lambda: Cosine(max_steps=0), "schedule.max_steps must be >= 1"),
    (lambda: Constant(warmup_steps=1.5), "schedule.warmup_steps must be an integer"),
    (lambda: Plateau(factor=1.0), r"schedule.factor must be in \(0, 1\)"),
    (lambda: WarmupCosine(max_steps=10, eta_min=-1), "schedule.eta_min must be >= 0"),
])
def test_invalid_values_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()
