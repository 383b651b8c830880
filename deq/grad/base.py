"""What every backward pass shares: the base class, the registry, the adjoint hook.

A backward object receives the detached fixed point ``z*`` and returns a tensor
(or tuple) whose autograd graph yields the gradient it promises. Backward
objects know nothing of how ``z*`` was found.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .._registry import Registry
from ..solvers.base import SolverResult, State, _flatten, _spec_of, _unflatten


class ConvergenceError(RuntimeError):
    """A solve did not reach its tolerance (or diverged) and the policy is to raise.

    Raised by :class:`deq.DEQLayer` with ``on_nonconvergence="raise"`` and by
    :class:`deq.grad.Implicit` with ``on_divergence="raise"``.
    """


# Called by a backward object with the result of its solve and, when some sample
# failed, the (B,) bool mask of the samples whose solve diverged (None: none did).
Report = Callable[[SolverResult, "Tensor | None"], None]


class Backward:
    """Base class: ``attach(f, z_star, x) -> z`` with the promised gradient.

    Subclasses are frozen dataclasses of their options. Those that keep a single
    graph of ``f`` and rewrite the gradient flowing into it (Implicit, NPG)
    implement ``adjoint(vjp, v, report, dtype=...)``: given ``v = dL/df(z*)``
    (flat ``(B, D)``) and ``vjp(u) = u^T J_f(z*)``, return the vector to push
    through the graph of ``f`` instead of ``v``. ``dtype`` is the narrowest
    floating dtype ``f`` ran in when it was re-attached (:func:`compute_dtype`),
    for tolerances that must be reachable in it.

    When nothing but ``z*`` needs a gradient (a frozen ``f``, an ``x`` that
    needs none), the re-attached output is returned detached: no adjoint is
    ever computed for it.
    """

    name: ClassVar[str] = ""

    def attach(self, f: Callable[[State, Any], State], z_star: State, x: Any, *,
               report: Report | None = None) -> State:
        """Re-attach ``z_star`` to the graph of ``f`` through :class:`_AdjointFn`."""
        return _attach_adjoint(self, f, z_star, x, report)

    def adjoint(self, vjp: Callable[[Tensor], Tensor], v: Tensor, report: Report | None, *,
                dtype: torch.dtype) -> Tensor:
        raise NotImplementedError  # abstract


_BACKWARDS: Registry[Backward] = Registry("backward", Backward, plural="backward passes")
register = _BACKWARDS.register


def backward_names() -> list[str]:
    """The names accepted by ``backward=`` (sorted)."""
    return _BACKWARDS.names()


def get_backward(backward: "Backward | str") -> Backward:
    """A backward object from an object or a registered name (``ValueError`` lists the names)."""
    return _BACKWARDS.get(backward)


def as_tuple(z: State) -> tuple[Tensor, ...]:
    return z if isinstance(z, tuple) else (z,)


def detached_input(z_star: State) -> State:
    """``z*`` as new leaves that require grad (no copy): the linearisation point."""
    parts = tuple(t.detach().requires_grad_() for t in as_tuple(z_star))
    return parts if isinstance(z_star, tuple) else parts[0]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, or ``None``."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        pass
    return None


def compute_dtype(parts: tuple[Tensor, ...]) -> torch.dtype:
    """The narrowest floating dtype ``f`` runs in, for tensors ``parts`` it is called on or returned.

    The dtypes of ``parts`` and, when autocast is enabled for their device, the
    autocast dtype (autograd replays the forward's dtypes in the backward, so
    what counts is the autocast state when ``f`` ran, not when ``backward()``
    runs). "Narrowest" is the largest machine epsilon. An ``f`` that casts to a
    narrower dtype by itself, without autocast, is not detected.
    """
    dtypes = [t.dtype for t in parts if t.dtype.is_floating_point]
    auto = _autocast_dtype(parts[0].device.type)
    if auto is not None:
        dtypes.append(auto)
    return max(dtypes, key=lambda dt: torch.finfo(dt).eps)


def _needs_grad_beyond(outputs: tuple[Tensor, ...], leaves: tuple[Tensor, ...]) -> bool:
    """Whether the graph of ``outputs`` reaches a tensor needing a gradient other than ``leaves``.

    A depth-first walk that stops at the first such tensor (a parameter is
    usually a few nodes away); the whole graph is walked only when the answer
    is no. A tensor that needs a gradient is a leaf (``AccumulateGrad``) or is
    computed from one, so looking at leaves is enough: an ``autograd.Function``
    sends gradients to its inputs only, which are its graph's next nodes.
    (Reentrant ``torch.utils.checkpoint`` breaks that rule, and PyTorch refuses
    it under the ``autograd.grad`` every VJP uses; the non-reentrant one keeps
    an ordinary graph.)
    """
    own = {id(t) for t in leaves}
    stack, seen = [], set()
    for t in outputs:
        if t.grad_fn is not None:
            stack.append(t.grad_fn)
        elif t.requires_grad and id(t) not in own:
            return True
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # set on AccumulateGrad nodes only
        if var is not None and id(var) not in own:
            return True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


def _attach_adjoint(obj: Backward, f, z_star: State, x: Any, report: Report | None) -> State:
    z_in = detached_input(z_star)
    with torch.enable_grad():
        fz = f(z_in, x)
    fz_parts, z_parts = as_tuple(fz), as_tuple(z_in)
    if not _needs_grad_beyond(fz_parts, z_parts):
        # Frozen f and an x that needs no gradient: no backward will ever want
        # an adjoint, so none is attached (and the output can be modified in place).
        out = tuple(t.detach() for t in fz_parts)
    else:
        out = _AdjointFn.apply(obj, report, compute_dtype(fz_parts + z_parts), len(fz_parts), *fz_parts, *z_parts)
    return tuple(out) if isinstance(z_star, tuple) else out[0]


class _AdjointFn(torch.autograd.Function):
    """Identity on ``f(z*)`` whose backward replaces ``v`` by ``obj.adjoint(vjp, v)``.

    Inputs are ``f(z*)`` (with its graph) and the leaf ``z*`` it was computed
    from. The VJPs ``u^T J_f(z*)`` reuse that one graph (``retain_graph``); the
    engine then sends the adjoint through the same graph to the parameters and
    ``x``. So the whole backward keeps one graph of ``f``, linearised at the
    very ``z*`` the forward returned.

    The outputs are views of ``f(z*)`` (no copy, so the layer keeps exactly one
    graph of ``f`` and nothing beside it); like every view a custom Function
    returns, they cannot be modified in place (PyTorch raises "Output 0 of
    _AdjointFn is a view and is being modified inplace"): clone first.

    First derivatives only: the adjoint comes out of a solve that keeps no
    graph, so differentiating the gradient again (``create_graph=True``, then a
    second ``grad``) would silently treat the adjoint as a constant. Under
    ``create_graph=True`` the adjoint is passed through :class:`_FirstOrderOnly`,
    which raises if a second derivative ever reaches it.
    """

    @staticmethod
    def forward(ctx, obj, report, dtype, n, *tensors):
        ctx.obj, ctx.report, ctx.dtype, ctx.n = obj, report, dtype, n
        ctx.save_for_backward(*tensors)
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        with torch.no_grad():
            adj = _AdjointFn._adjoint(ctx, grads)
        if torch.is_grad_enabled():  # create_graph=True
            # Anchored to f(z*) (whose graph reaches theta and x) and to any
            # incoming gradient with a graph, so every second-order path that
            # runs through the adjoint meets the raising node.
            anchors = (*ctx.saved_tensors[:ctx.n], *(g for g in grads if g.requires_grad))
            adj = tuple(_FirstOrderOnly.apply(a, *anchors) for a in adj)
        return (None, None, None, None, *adj, *(None,) * (len(ctx.saved_tensors) - ctx.n))

    @staticmethod
    def _adjoint(ctx, grads):
        saved = ctx.saved_tensors
        # An output the loss does not use arrives as zeros (autograd materialises them), never None.
        fz, z_in = saved[:ctx.n], saved[ctx.n:]
        spec = _spec_of(grads if len(grads) > 1 else grads[0])
        z_spec = _spec_of(z_in if len(z_in) > 1 else z_in[0])

        def vjp(u: Tensor) -> Tensor:
            us = as_tuple(_unflatten(u, spec))
            gs = torch.autograd.grad(fz, z_in, us, retain_graph=True, allow_unused=True)
            gs = tuple(torch.zeros_like(z) if g is None else g for g, z in zip(gs, z_in))
            return _flatten(gs if len(gs) > 1 else gs[0], z_spec)

        v = _flatten(grads if len(grads) > 1 else grads[0], spec)
        return as_tuple(_unflatten(ctx.obj.adjoint(vjp, v, ctx.report, dtype=ctx.dtype), spec))


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the adjoint; its backward (a second derivative) raises.

    ``torch.autograd.function.once_differentiable`` is not enough here: its
    error node hangs off fresh leaves, so ``torch.autograd.grad(..., inputs=x)``
    prunes it and returns a wrong second derivative without a word.
    """

    @staticmethod
    def forward(ctx, adj, *anchors):
        return adj.view_as(adj)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("DEQLayer: the gradient of an Implicit/NPG backward is not differentiable again "
                           "(the adjoint solve keeps no graph); second derivatives through it are not "
                           "supported. Use UPG/JFB (plain autograd) or differentiate the unrolled layer.")
