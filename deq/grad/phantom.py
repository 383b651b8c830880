"""Phantom gradients: UPG (damped unrolling), NPG (Neumann series), JFB."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Backward, as_tuple, register


def _check_phantom(k: int, damping: float) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")


@register("upg")
@dataclass(frozen=True)
class UPG(Backward):
    """Unrolling-based phantom gradient: backprop through k damped steps from ``z*``.

    Starting at the detached ``z_0 = z*``::

        z_{i+1} = damping * f(z_i, x) + (1 - damping) * z_i,   i < k

    and ``z_k`` is returned with its ordinary autograd graph. Memory: ``k``
    graphs of ``f``; cost: ``k`` VJPs. ``UPG(k=1, damping=1)`` is JFB. No solve
    runs in the backward, so ``layer.last_result.backward`` stays ``None``: the
    cost is fixed (``k`` VJPs, whatever ``f``) and there is no residual to
    report. The output is plain autograd: it may be modified in place, and
    ``f`` is called ``k`` more times in the forward (not in the backward).

    Args:
        k: number of unrolled steps, ``k >= 1``.
        damping: ``lambda`` in ``(0, 1]``.

    Raises:
        ValueError: ``k < 1`` or ``damping`` outside ``(0, 1]``.

    Example:
        >>> layer = DEQLayer(f, backward=UPG(k=5, damping=0.5))

    References:
        Geng, Zhang, Bai, Wang, Lin, On Training Implicit Models, NeurIPS 2021.
    """

    k: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        _check_phantom(self.k, self.damping)

    def attach(self, f, z_star, x, *, report=None):
        z = tuple(t.detach() for t in as_tuple(z_star))
        with torch.enable_grad():
            for _ in range(self.k):
                fz = as_tuple(f(z if isinstance(z_star, tuple) else z[0], x))
                # b.to(a.dtype): under autocast f may return a narrower dtype than z.
                z = fz if self.damping == 1.0 else tuple(a.lerp(b.to(a.dtype), self.damping) for a, b in zip(z, fz))
        return z if isinstance(z_star, tuple) else z[0]


@register("npg")
@dataclass(frozen=True)
class NPG(Backward):
    """Neumann-series phantom gradient through one graph of ``f``.

    Replaces the exact adjoint ``(I - J^T)^{-1} v`` by the truncated series::

        g = damping * (I + B + ... + B^{k-1}) v,   B = damping * J^T + (1 - damping) * I

    at ``z*``, then pushes ``g`` through the graph of ``f``: ``k - 1`` VJPs for
    the series and one for the parameters, all through one graph (unlike UPG,
    which keeps ``k``). It equals UPG's gradient for a linear ``f``.

    No solve runs, so ``layer.last_result.backward`` stays ``None``: the cost
    is fixed at ``k`` VJPs (backward hooks inside ``f`` fire ``k`` times). As
    with :class:`Implicit`, the output is a view of the re-attached
    ``f(z*)`` and cannot be modified in place (clone it first); when nothing
    but ``z*`` needs a gradient the output is returned detached.

    Args:
        k: number of series terms, ``k >= 1``.
        damping: ``lambda`` in ``(0, 1]``.

    Raises:
        ValueError: ``k < 1`` or ``damping`` outside ``(0, 1]``.

    Example:
        >>> layer = DEQLayer(f, backward=NPG(k=5, damping=0.5))

    References:
        Geng, Zhang, Bai, Wang, Lin, On Training Implicit Models, NeurIPS 2021.
    """

    k: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        _check_phantom(self.k, self.damping)

    def adjoint(self, vjp, v, report, *, dtype=None):
        term, total = v, v
        for _ in range(self.k - 1):
            term = self.damping * vjp(term) + (1 - self.damping) * term
            total = total + term
        return self.damping * total


def JFB() -> UPG:
    """Jacobian-free backprop (Fung et al., AAAI 2022): ``UPG(k=1, damping=1.0)``.

    The gradient of one plain step ``f(z*, x)`` with ``z*`` detached: one VJP,
    no solve (``layer.last_result.backward`` stays ``None``).
    """
    return UPG(k=1, damping=1.0)


register("jfb", JFB)(JFB)
