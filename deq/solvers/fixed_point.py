"""Fixed-point iteration with optional damping."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Solver, register


@register("fixed_point")
@dataclass(frozen=True)
class FixedPoint(Solver):
    """Plain (Picard) iteration ``z <- damping * f(z) + (1 - damping) * z``.

    Converges linearly, at the rate of the spectral radius of the damped Jacobian
    ``damping * J + (1 - damping) * I``, when that is below one.

    Args:
        damping: the step ``damping`` in ``(0, 1]``; 1 is the undamped iteration.

    Raises:
        ValueError: ``damping`` outside ``(0, 1]``.

    Example:
        >>> res = solve(torch.cos, torch.zeros(2, 1), solver=FixedPoint(damping=0.8))
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {self.damping!r}")

    def init(self, z: Tensor, fz: Tensor) -> None:
        return None

    def step(self, state, z, fz, active, evaluate):
        # lerp with a per-sample weight (damping, or 0 for stopped samples) is
        # exact at weights 0 and 1 and cheaper than torch.where on CPU.
        weight = active.to(z.dtype)
        if self.damping != 1.0:
            weight = weight * self.damping
        z_new = z.lerp(fz, weight[:, None])
        return state, z_new, evaluate(z_new, active)
