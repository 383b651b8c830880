"""Fixed-point iteration with optional damping."""

from __future__ import annotations

from dataclasses import dataclass

from .contract import Iterate, Solver, register


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

    def init(self, it: Iterate) -> None:
        return None

    def causal(self, length: int) -> "FixedPoint":
        return self  # row by row: position t's step uses its own row only

    def step(self, state, it, active, evaluate):
        # lerp with a per-sample weight (damping, or 0 for stopped samples) is
        # exact at weights 0 and 1 (the undamped step is f(z) to the bit, as the
        # unrolled network computes it) and cheaper than torch.where on CPU.
        weight = active.to(it.z.dtype)
        if self.damping != 1.0:
            weight = weight * self.damping
        z_new = it.z.lerp(it.fz, weight[:, None])
        fz = evaluate(z_new, active)
        return state, z_new, fz, fz - z_new
