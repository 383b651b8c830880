"""One optimisation step: precision, the Jacobian regulariser, the non-finite guard, clipping.

A step (:meth:`Stepper.step`) runs the forward under the chosen precision, adds
``weight * jac_loss`` when the plan asks for the Jacobian regulariser, agrees
across DDP ranks on whether the loss is finite (one all-reduce, which also sums
the logged loss), runs the backward (scaled under fp16), checks the global
gradient norm, clips and steps. A non-finite loss, Jacobian term or gradient
norm, or a :class:`deq.NonFiniteError` from a solver, skips the step: no
parameter changes and the outcome says why.

Precision (``train.precision``): ``fp32``; ``bf16``, autocast on any device
(on the CPU too, so the tests reach the same code path as CUDA); ``fp16``,
autocast on CUDA with a :class:`torch.amp.GradScaler`. A gradient overflow
under fp16 is the scaler's business (it lowers the scale and the step is
skipped); it is reported as ``overflow`` and is not a non-finite step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

import deq

from .distributed import DistInfo, all_reduce

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16, ``None`` otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one step does, decided by the loop before it runs.

    Attributes:
        unrolled: the explicit weight-tied network (pretraining, the explicit twin) rather than the DEQ.
        max_iter: the forward solver budget of this step (``None``: the layer's).
        jac_probes: Hutchinson probes of the Jacobian regulariser (0: none this step).
        jac_weight: its weight in the loss, ``loss = nll + jac_weight * jac_loss``.
    """

    unrolled: bool
    max_iter: int | None = None
    jac_probes: int = 0
    jac_weight: float = 0.0


@dataclasses.dataclass
class StepOutcome:
    """What one step did.

    Attributes:
        ok: the parameters were updated.
        loss: mean NLL over the whole (all-rank) batch; NaN when not finite.
        n_tokens: target tokens over all ranks.
        grad_norm: global gradient norm before clipping (NaN when not computed).
        jac_loss: the Jacobian term, mean over ranks (``None`` when not computed).
        reason: why the step was skipped.
        overflow: skipped by the fp16 gradient scaler (a loss-scale overflow).
        mems: the memory to carry (``None`` after a skipped step).
    """

    ok: bool
    loss: float
    n_tokens: int
    grad_norm: float = math.nan
    jac_loss: float | None = None
    reason: str | None = None
    overflow: bool = False
    mems: Any = None


def global_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all gradients together (float32 or wider), as a 0-d tensor."""
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))


@dataclasses.dataclass
class Stepper:
    """Everything a step needs besides the batch and the plan.

    Attributes:
        net: the model, or its DistributedDataParallel wrapper (called for the forward).
        model: the model itself (its parameters).
        optimizer: steps the parameters.
        clip: maximum global gradient norm (``None``: no clipping; the norm is still checked).
        precision: ``fp32``, ``bf16`` or ``fp16``.
        scaler: the fp16 gradient scaler, or ``None``.
        info, device: the job and this process's device.
    """

    net: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    clip: float | None
    precision: str
    scaler: torch.amp.GradScaler | None
    info: DistInfo
    device: torch.device

    def step(self, input: Tensor, target: Tensor, *, mems: Any, plan: StepPlan) -> StepOutcome:
        """Zero the gradients, forward and backward, check, clip and step; see the module docstring."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        outcome, loss = self._forward(input, target, mems, plan)
        if outcome.ok:
            self._backward(outcome, loss)
        if outcome.ok:
            self._update(outcome)
        if not outcome.ok:
            self.optimizer.zero_grad(set_to_none=True)
            outcome.mems = None
        return outcome

    def _forward(self, input: Tensor, target: Tensor, mems: Any, plan: StepPlan) -> tuple[StepOutcome, Tensor]:
        """The loss, and its finiteness agreed across ranks in one all-reduce."""
        call: dict[str, Any] = {"mems": mems}
        if not plan.unrolled and plan.max_iter is not None:
            call["max_iter"] = plan.max_iter
        if not plan.unrolled and plan.jac_probes:
            call["jac_reg"] = plan.jac_probes
        reason, out, loss, nll, jac = None, None, None, math.nan, 0.0
        try:
            with autocast(self.precision, self.device):
                out = self.net(input, target, **call)
            loss = out.loss
            nll = float(out.nll_sum.detach().double())
            if "jac_reg" in call:
                jac = float(out.jac_loss.detach().double())
                loss = loss + plan.jac_weight * out.jac_loss
            if not math.isfinite(nll):
                reason = "non-finite loss"
            elif not math.isfinite(jac):
                reason = "non-finite Jacobian regulariser"
        except deq.NonFiniteError as err:
            reason = f"solver: {err}"
        # A rank that skips must not leave the others waiting in DDP's gradient all-reduce.
        bad, nll_sum, n_tokens, jac_sum = all_reduce(
            [float(reason is not None), 0.0 if reason else nll, float(target.numel()), 0.0 if reason else jac],
            self.info, self.device)
        if bad:
            return StepOutcome(False, math.nan, int(n_tokens), reason=reason or "non-finite loss on another rank"), loss
        jac_loss = jac_sum / self.info.world_size if "jac_reg" in call else None
        return StepOutcome(True, nll_sum / n_tokens, int(n_tokens), jac_loss=jac_loss, mems=out.mems), loss

    def _backward(self, outcome: StepOutcome, loss: Tensor) -> None:
        try:
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        except deq.NonFiniteError as err:
            if self.info.enabled:
                # The other ranks are inside DDP's all-reduce already; no consistent way to skip.
                raise
            outcome.ok, outcome.reason = False, f"backward solver: {err}"

    def _update(self, outcome: StepOutcome) -> None:
        """Unscale (fp16), check the global norm, clip, step."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # After DDP's all-reduce every rank holds the same gradients, hence the same norm and decision.
        norm = global_norm(grads)
        outcome.grad_norm = float(norm)
        if not math.isfinite(outcome.grad_norm):
            outcome.ok = False
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale: the overflow recorded by unscale_
                outcome.overflow = True
                outcome.reason = f"fp16 gradient overflow; loss scale lowered to {self.scaler.get_scale():g}"
            else:
                outcome.reason = "non-finite gradient"
            return
        if self.clip is not None:
            # clip_grad_norm_'s rule, on the norm already computed (one pass over the gradients, not two).
            scale = (self.clip / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(scale.to(g.dtype))
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
