"""experiments.step: how the Jacobian term enters the loss, the forward budget, clipping, the
non-finite reasons, the fp16 gradient scaler's overflow path, and bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deq.models.output import LMOutput
from experiments.distributed import DistInfo
from experiments.step import StepPlan, Stepper, autocast, global_norm


class Quadratic(nn.Module):
    """A stand-in language model: nll = 3 sum(w^2), jac_loss = sum(w^4); records its call options."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.calls = []

    def forward(self, input, target, *, mems=None, max_iter=None, jac_reg=0):
        self.calls.append({"max_iter": max_iter, "jac_reg": jac_reg})
        nll = 3 * (self.w ** 2).sum()
        jac = (self.w ** 4).sum() if jac_reg else None
        return LMOutput(loss=nll / 2, nll_sum=nll, n_tokens=2, mems="next", jac_loss=jac)


def _stepper(model, *, lr=0.1, clip=None, scaler=None, precision="fp32"):
    return Stepper(net=model, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), clip=clip,
                   precision=precision, scaler=scaler, info=DistInfo(), device=torch.device("cpu"))


BATCH = (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def test_the_jacobian_term_is_added_with_its_weight():
    model = Quadratic()
    w0 = model.w.detach().clone()
    plan = StepPlan(unrolled=False, max_iter=7, jac_probes=2, jac_weight=2.5)
    out = _stepper(model).step(*BATCH, mems=None, plan=plan)
    # loss = nll / n + 2.5 jac: gradient 3 w + 2.5 * 4 w^3.
    torch.testing.assert_close(model.w.detach(), w0 - 0.1 * (3 * w0 + 10 * w0 ** 3), rtol=0, atol=1e-15)
    assert model.calls == [{"max_iter": 7, "jac_reg": 2}]
    assert out.ok and out.loss == pytest.approx(3 * 5.25 / 2) and out.jac_loss == pytest.approx(1 + 16 + 0.0625)
    assert out.mems == "next" and out.grad_norm == pytest.approx(float((3 * w0 + 10 * w0 ** 3).norm()))


def test_unrolled_steps_get_neither_a_budget_nor_the_regulariser():
    model = Quadratic()
    w0 = model.w.detach().clone()
    plan = StepPlan(unrolled=True, max_iter=7, jac_probes=1, jac_weight=2.0)
    out = _stepper(model).step(*BATCH, mems=None, plan=plan)
    assert model.calls == [{"max_iter": None, "jac_reg": 0}] and out.jac_loss is None
    torch.testing.assert_close(model.w.detach(), w0 - 0.1 * 3 * w0, rtol=0, atol=1e-15)


def test_clipping_scales_to_the_maximum_norm():
    model = Quadratic()
    w0 = model.w.detach().clone()
    grad = 3 * w0
    out = _stepper(model, lr=1.0, clip=0.5).step(*BATCH, mems=None, plan=StepPlan(unrolled=True))
    torch.testing.assert_close(model.w.detach(), w0 - grad * 0.5 / (grad.norm() + 1e-6), rtol=0, atol=1e-12)
    assert out.grad_norm == pytest.approx(float(grad.norm()))


def test_non_finite_jacobian_term_skips_the_step():
    model = Quadratic()
    with torch.no_grad():
        model.w[0] = 1e100  # w^4 overflows float64, w^2 does not
    before = model.w.detach().clone()
    out = _stepper(model).step(*BATCH, mems=None, plan=StepPlan(unrolled=False, jac_probes=1, jac_weight=1.0))
    assert not out.ok and out.reason == "non-finite Jacobian regulariser" and out.mems is None
    assert torch.equal(model.w.detach(), before) and model.w.grad is None


def test_fp16_overflow_lowers_the_loss_scale_and_skips_the_step():
    # The scaler's path on the CPU (fp16 autocast itself is CUDA-only in the loop): an overflow in
    # the scaled gradients skips the step as an overflow, not as a non-finite step, and halves the scale.
    model = Quadratic()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    model.w.register_hook(lambda g: g * math.inf if hook_on["on"] else g)
    hook_on = {"on": True}
    before = model.w.detach().clone()
    out = _stepper(model, scaler=scaler).step(*BATCH, mems=None, plan=StepPlan(unrolled=True))
    assert not out.ok and out.overflow and out.reason == "fp16 gradient overflow; loss scale lowered to 512"
    assert torch.equal(model.w.detach(), before) and scaler.get_scale() == 512.0
    hook_on["on"] = False
    out = _stepper(model, scaler=scaler).step(*BATCH, mems=None, plan=StepPlan(unrolled=True))
    # Unscaled before the norm and the step: the same update as without a scaler.
    assert out.ok and out.grad_norm == pytest.approx(float((3 * before).norm()))
    torch.testing.assert_close(model.w.detach(), before - 0.1 * 3 * before, rtol=0, atol=1e-15)


def test_bf16_autocast_context_on_the_cpu():
    with autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_global_norm_is_the_norm_of_all_gradients_together():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]], dtype=torch.bfloat16)]
    assert float(global_norm(grads)) == pytest.approx(13.0)
    assert float(global_norm([])) == 0.0
