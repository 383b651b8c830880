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
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _torch_weight_norm

from .dropout import WeightDropout

__all__ = ["WeightNormDropConnect", "apply_weight_norm", "cached_weights", "weight_dropconnect",
           "weight_norm_tensors"]


def _norm_except(v: Tensor, dim: int | None) -> Tensor:
    """2-norm of ``v`` over every dim except ``dim`` (all dims for ``None``), keepdim."""
    if dim is None:
        return torch.linalg.vector_norm(v)
    dim = dim % v.dim()
    others = [d for d in range(v.dim()) if d != dim]
    return torch.linalg.vector_norm(v, dim=others, keepdim=True)


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
                    getattr(sub, tensor_name)
        yield
