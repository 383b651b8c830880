"""Weight normalisation computed once per forward, not once per solver iteration.

Weight normalisation (Salimans and Kingma, 2016) writes a weight as
``w = g * v / ||v||`` (norm per output channel, ``dim=0``) and trains ``g``
and ``v``. We use PyTorch's own
:func:`torch.nn.utils.parametrizations.weight_norm`, which recomputes ``w``
each time ``module.weight`` is read. Inside a DEQ the equilibrium function is
called dozens of times per segment, so ``w`` would be recomputed dozens of
times, each one a new autograd node. :func:`cached_weights` prevents that: it
enters :func:`torch.nn.utils.parametrize.cached` and evaluates every
parametrized tensor of the model once, on entry, in the caller's grad mode.
Every read inside the context returns that one tensor; gradients of all the
calls that used it meet at it and flow on to ``g`` and ``v`` once.

Why evaluate on entry: the DEQ solver runs ``f`` under ``torch.no_grad``. If
the first read of the weight happened there, the cache would hold a tensor
with no autograd history and every later read (the re-attached call included)
would reuse it: the gradient to ``g`` and ``v`` would silently be lost.
Filling the cache before the solver runs makes the cached weight carry its graph.

The contract, for a model that owns a DEQ layer::

    def forward(self, tokens):
        self.reset_masks(...)               # draw dropout masks first (WeightDropout is part of the weight)
        with cached_weights(self):          # weights computed here, once
            z = self.deq(x)                 # every f call reuses them
            loss = ...                      # the re-attached call and unrolled steps too
        return loss                         # backward() may run after the context exits

DropConnect (``wdrop``) under weight norm is applied to the direction ``v``
before normalising, as the DEQ-TrellisNet code does: :func:`apply_weight_norm`
with ``dropconnect > 0`` registers :class:`WeightNormDropConnect` instead of
PyTorch's weight norm (same ``g``/``v`` parameters). Its mask, like every mask
in :mod:`deq.models.dropout`, is drawn by an explicit ``reset`` once per
segment, before entering :func:`cached_weights`.

Caveat (PyTorch's cache is process-global and cleared only when the outermost
``cached()`` context exits): do not wrap an optimizer step inside one context,
or the next forward would reuse weights computed before the step.

**A convolution that does not save its kernel.** Autograd saves the weight a
convolution multiplies with, so a cached weight-normalised kernel is kept for
the backward pass: for DEQ-TrellisNet at PTB size (1400 -> 5600 channels,
kernel 2) that is 59.8 MiB, as much as several layers of activations.
:class:`WeightNormConv1d` instead computes ``w = g * v / ||v||`` inside one
``autograd.Function`` (``_WeightNormConv1dFn``) at every call and saves
``g``, ``v`` (parameters, alive anyway), the input and the bool DropConnect
keep mask (one byte per dropped entry: for temporal DropConnect the taps on
earlier time steps only, 7.5 MiB at PTB size); its backward recomputes ``w``,
an O(parameters) cost, negligible beside the convolution's O(parameters x B x L).
It needs no cache: its gradient to ``g`` and ``v`` is right whatever grad mode
its first call runs in, so :func:`cached_weights` leaves it out.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm

from .dropout import WeightDropout, dropconnect

__all__ = ["WeightNormConv1d", "WeightNormDropConnect", "apply_weight_norm", "cached_weights",
           "weight_dropconnect", "weight_norm_tensors", "weight_norm_conv1d"]


def _dims_except(v: Tensor, dim: int | None) -> list[int]:
    if dim is None:
        return list(range(v.dim()))
    dim = dim % v.dim()
    return [d for d in range(v.dim()) if d != dim]


def _norm_except(v: Tensor, dim: int | None) -> Tensor:
    """2-norm of ``v`` over every dim except ``dim`` (all dims for ``None``), keepdim."""
    return torch.linalg.vector_norm(v, dim=_dims_except(v, dim), keepdim=True)


class WeightNormDropConnect(nn.Module):
    """Weight-norm parametrization with DropConnect on the direction: ``w = g * d(v) / ||d(v)||``.

    ``d`` is a :class:`deq.models.dropout.WeightDropout` (the identity in eval
    mode), so in eval mode this is exactly weight normalisation. Dropping ``v``
    before normalising, rather than the normalised ``w``, is what the DEQ-TrellisNet
    code does with ``wdrop`` under weight norm ("we apply the dropout to its
    direction, instead of scale"): each output channel keeps its norm ``g``.
    Used by :func:`apply_weight_norm` when ``dropconnect > 0``; the trainable
    tensors are ``original0`` (``g``) and ``original1`` (``v``) as with PyTorch's
    own weight norm, so state dicts and parameter counts are the same.

    Args:
        dim: the dimension kept out of the norm (0: per output channel).
        p: DropConnect probability on ``v``, in ``[0, 1)``.
        temporal: drop only the kernel taps on earlier time steps (see
            :class:`~deq.models.dropout.WeightDropout`).
    """

    def __init__(self, dim: int | None = 0, *, p: float, temporal: bool = True):
        super().__init__()
        self.dim = dim
        self.dropconnect = WeightDropout(p, temporal=temporal)

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        v = self.dropconnect(weight_v)
        return v * (weight_g / _norm_except(v, self.dim))

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return _norm_except(weight, self.dim), weight


def apply_weight_norm(module: nn.Module, name: str = "weight", *, dim: int | None = 0,
                      dropconnect: float = 0.0, temporal: bool = True) -> nn.Module:
    """Weight-normalise ``module.<name>`` in place (optionally with DropConnect on ``v``).

    ``w = g * v / ||v||``, the norm taken over every dim except ``dim`` (per
    output channel for ``dim=0``). The trainable tensors become
    ``module.parametrizations.<name>.original0`` (``g``, shape ``(C_out, 1, ...)``)
    and ``.original1`` (``v``, the weight's shape), initialised so that ``w`` is
    unchanged. Both count as parameters, as in the original DEQ/TrellisNet code.
    With ``dropconnect == 0`` this is PyTorch's
    :func:`torch.nn.utils.parametrizations.weight_norm`; otherwise it is
    :class:`WeightNormDropConnect`, whose mask is drawn by
    ``weight_dropconnect(module, name).reset(v)`` once per segment.

    Args:
        module: the module holding the weight (e.g. ``nn.Conv1d``).
        name: the weight's attribute name.
        dim: the dimension kept out of the norm; ``None`` for one norm over the
            whole tensor.
        dropconnect: DropConnect probability on the direction ``v`` (``wdrop``).
        temporal: with ``dropconnect``, drop only the taps on earlier time steps.

    Returns:
        ``module`` itself (parametrized).

    Raises:
        ValueError: ``dropconnect`` outside ``[0, 1)``.

    References:
        Salimans and Kingma, Weight Normalization (NeurIPS 2016).
    """
    if dropconnect == 0.0:
        return _torch_weight_norm(module, name=name, dim=dim)
    param = WeightNormDropConnect(dim, p=dropconnect, temporal=temporal)
    # unsafe=True: the safe path evaluates the parametrization at registration,
    # which in training mode raises for want of a DropConnect mask.
    parametrize.register_parametrization(module, name, param, unsafe=True)
    return module


def weight_dropconnect(module: nn.Module, name: str = "weight") -> WeightDropout | None:
    """The DropConnect of a weight normalised with ``apply_weight_norm(..., dropconnect=p)``, or ``None``."""
    if not parametrize.is_parametrized(module, name):
        return None
    for param in module.parametrizations[name]:
        if isinstance(param, WeightNormDropConnect):
            return param.dropconnect
    return None


def weight_norm_tensors(module: nn.Module, name: str = "weight") -> tuple[nn.Parameter, nn.Parameter]:
    """``(g, v)`` of a module weight-normalised by :func:`apply_weight_norm`.

    Raises:
        ValueError: ``module.<name>`` is not parametrized.
    """
    if not parametrize.is_parametrized(module, name):
        raise ValueError(f"{type(module).__name__}.{name} is not parametrized; call apply_weight_norm first")
    plist = module.parametrizations[name]
    return plist.original0, plist.original1


@contextlib.contextmanager
def cached_weights(module: nn.Module) -> Iterator[None]:
    """Compute every parametrized tensor of ``module`` once and reuse it inside the context.

    Enters :func:`torch.nn.utils.parametrize.cached` and reads each
    parametrized tensor (weight norm, weight dropout, ...) of ``module`` and
    its submodules once, in the current grad mode, so that later reads (also
    under ``torch.no_grad``, as in a DEQ solver) return the same tensor, with
    its autograd graph to the original parameters. Enter it in the forward,
    after drawing dropout masks and before the DEQ layer runs. ``backward()``
    may be called after the context has exited.

    Args:
        module: the model (or any module) whose parametrized tensors to cache.

    Yields:
        Nothing; reads of parametrized tensors are cached until the outermost
        ``parametrize.cached()`` context exits.
    """
    with parametrize.cached():
        for sub in module.modules():
            if parametrize.is_parametrized(sub):
                for tensor_name in sub.parametrizations.keys():
                    # WeightNormConv1d never reads its parametrized weight (it recomputes
                    # the kernel itself): evaluating it here would only hold a graph.
                    if not (isinstance(sub, WeightNormConv1d) and tensor_name == "weight"):
                        getattr(sub, tensor_name)
        yield


def _dropped(v: Tensor, keep: Tensor | None, scale: float) -> Tensor:
    """``v'``: ``v`` with DropConnect (:func:`~deq.models.dropout.dropconnect`), or ``v`` without a mask."""
    return v if keep is None else dropconnect(v, keep, scale)


def _kernel(g: Tensor, v: Tensor, keep: Tensor | None, scale: float) -> Tensor:
    """``w = g * v' / ||v'||`` (norm per output channel) with ``v'`` the DropConnect-ed direction."""
    v = _dropped(v, keep, scale)
    return v * (g / _norm_except(v, 0))


def _kernel_vjp(grad_w: Tensor, g: Tensor, v: Tensor, keep: Tensor | None,
                scale: float) -> tuple[Tensor, Tensor]:
    """``(dL/dg, dL/dv)`` from ``G = dL/dw`` for ``w = g v' / n``, ``n = ||v'||``, ``v' = D(v)``.

    ``dL/dg = <G, v'> / n`` and ``dL/dv' = (g / n) (G - v' <G, v'> / n^2)``, sums
    over each output channel; ``dL/dv = D(dL/dv')``, DropConnect ``D`` being
    diagonal. Plain differentiable ops, so this VJP can itself be
    differentiated (``create_graph=True``).
    """
    v = _dropped(v, keep, scale)
    dims = _dims_except(v, 0)
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    dot = (grad_w * v).sum(dim=dims, keepdim=True)
    grad_g = dot / norm
    grad_v = _dropped((g / norm) * (grad_w - v * (dot / norm.square())), keep, scale)
    return grad_g, grad_v


class _WeightNormConv1dFn(torch.autograd.Function):
    """``conv1d(x, g v' / ||v'||, b)`` that saves ``x, g, v`` and the mask, and recomputes the kernel in backward.

    The kernel ``w`` is never saved: ``backward`` rebuilds it from ``g`` and
    ``v`` (O(parameters)), takes ``dL/dx``, ``dL/dw`` and ``dL/db`` from one
    ``aten.convolution_backward`` call and chains ``dL/dw`` to ``g`` and ``v``
    (:func:`_kernel_vjp`). Every op of the backward is differentiable, so a
    second derivative (``create_graph=True``, as Jacobian regularisation needs)
    is the exact one. Under autocast the convolution runs in the autocast
    dtype, as ``F.conv1d`` would; the backward computes in the dtype of the
    incoming gradient and returns each gradient in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, g, v, bias, keep, scale, stride, padding, dilation, groups):
        ctx.save_for_backward(x, g, v, keep)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.scale = scale
        ctx.bias = None if bias is None else (list(bias.shape), bias.dtype)
        return F.conv1d(x, _kernel(g, v, keep, scale), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, g, v, keep = ctx.saved_tensors
        scale = ctx.scale
        stride, padding, dilation, groups = ctx.conv
        need_x, need_g, need_v, need_b = ctx.needs_input_grad[:4]
        need_w = need_g or need_v
        dtype = grad_out.dtype  # the convolution's dtype (the autocast dtype under autocast)
        w = _kernel(g, v, keep, scale).to(dtype)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x.to(dtype), w, None if ctx.bias is None else ctx.bias[0], [stride], [padding], [dilation],
            False, [0], groups, [need_x, need_w, need_b])
        grad_g = grad_v = None
        if need_w:
            grad_g, grad_v = _kernel_vjp(grad_w.to(v.dtype), g, v, keep, scale)
        return (grad_x.to(x.dtype) if need_x else None, grad_g if need_g else None, grad_v if need_v else None,
                grad_b.to(ctx.bias[1]) if need_b else None, *(None,) * 6)


def weight_norm_conv1d(x: Tensor, g: Tensor, v: Tensor, bias: Tensor | None = None, *,
                       dropconnect: tuple[Tensor, float] | None = None, stride: int = 1, padding: int = 0,
                       dilation: int = 1, groups: int = 1) -> Tensor:
    """``F.conv1d(x, w, bias, ...)`` with ``w = g * v' / ||v'||``, the kernel not saved for backward.

    ``v'`` is ``v`` after DropConnect with ``dropconnect = (mask, scale)`` as
    :meth:`deq.models.dropout.WeightDropout.factors` returns it (see
    :func:`deq.models.dropout.dropconnect`), else ``v`` itself. The same value
    and gradients as building ``w`` with autograd and calling ``F.conv1d``, but
    autograd keeps ``x``, ``g``, ``v`` and the bool mask instead of ``w`` and
    ``v'``: the backward recomputes ``w``. The norm is per output channel
    (weight norm with ``dim=0``). See the module docstring.

    Args:
        x: ``(B, C_in, L)`` input.
        g: the norms, ``(C_out, 1, 1)``.
        v: the direction, ``(C_out, C_in / groups, k)``.
        bias: ``(C_out,)`` or ``None``.
        dropconnect: ``(mask, scale)``: a bool keep mask of ``v``'s shape, or
            one tap short for temporal DropConnect, and ``1 / (1 - p)``;
            ``None`` for no DropConnect.
        stride, padding, dilation, groups: as in ``F.conv1d`` (integers).

    Returns:
        ``(B, C_out, L_out)``.

    Raises:
        ValueError: a DropConnect mask whose shape does not fit ``v``.
    """
    keep, scale = (None, 1.0) if dropconnect is None else dropconnect
    if keep is not None and keep.shape not in (v.shape, (*v.shape[:-1], v.shape[-1] - 1)):
        raise ValueError(f"the DropConnect mask has shape {tuple(keep.shape)}, which does not fit the weight "
                         f"direction v {tuple(v.shape)}")
    return _WeightNormConv1dFn.apply(x, g, v, bias, keep, scale, stride, padding, dilation, groups)


class WeightNormConv1d(nn.Conv1d):
    """A weight-normalised ``nn.Conv1d`` (optionally with DropConnect) that does not save its kernel.

    ``w = g * d(v) / ||d(v)||`` per output channel, ``d`` DropConnect with
    probability ``dropconnect`` (taps on earlier time steps only with
    ``temporal``). The parameters are those of :func:`apply_weight_norm`
    (``parametrizations.weight.original0`` is ``g``, ``original1`` is ``v``),
    so ``self.weight`` still reads the normalised weight and state dicts match
    a plain weight-normalised ``nn.Conv1d``; but :meth:`forward` goes through
    :func:`weight_norm_conv1d`, which recomputes the kernel at each call and in
    the backward pass instead of saving it. Draw the DropConnect mask once per
    segment with :meth:`reset_dropconnect`.

    Args:
        in_channels, out_channels, kernel_size: as ``nn.Conv1d``.
        stride, padding, dilation, groups, bias: as ``nn.Conv1d`` (integer
            padding, zero padding only).
        dropconnect: DropConnect probability on ``v``, in ``[0, 1)``.
        temporal: with ``dropconnect``, drop only the taps on earlier time steps.
        init_std: if given, initialise weight and bias ``N(0, init_std)`` before
            normalising (``g = ||v||``: the initial weight is that draw);
            ``None`` keeps ``nn.Conv1d``'s initialisation.

    Raises:
        ValueError: ``dropconnect`` outside ``[0, 1)``.

    Example:
        >>> conv = WeightNormConv1d(16, 64, 2, dropconnect=0.5, init_std=0.01)
        >>> conv.reset_dropconnect()                     # once per segment, outside the solver
        >>> y = conv(torch.randn(8, 16, 31))             # (8, 64, 30); no kernel kept for backward
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True, dropconnect: float = 0.0,
                 temporal: bool = True, init_std: float | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        if init_std is not None:
            nn.init.normal_(self.weight, 0.0, init_std)
            if self.bias is not None:
                nn.init.normal_(self.bias, 0.0, init_std)
        apply_weight_norm(self, dim=0, dropconnect=dropconnect, temporal=temporal)

    def reset_dropconnect(self) -> None:
        """Draw this segment's DropConnect mask (once per segment, outside the solver); a no-op without."""
        drop = weight_dropconnect(self)
        if drop is not None:
            drop.reset(weight_norm_tensors(self)[1])

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C_in, L) -> (B, C_out, L_out)``; DropConnect applies in training mode.

        Raises:
            RuntimeError: training mode with DropConnect and no mask drawn.
        """
        g, v = weight_norm_tensors(self)
        drop = weight_dropconnect(self)
        return weight_norm_conv1d(x, g, v, self.bias, dropconnect=None if drop is None else drop.factors(),
                                  stride=self.stride[0], padding=self.padding[0], dilation=self.dilation[0],
                                  groups=self.groups)
