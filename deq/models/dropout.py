"""Dropout that stays fixed while a DEQ solves: variational, embedding and weight dropout.

A DEQ layer calls its function ``f`` dozens of times per segment (every solver
iteration, the re-attached call, and the backward pass). A dropout that drew a
fresh mask on every call would make ``f`` a different function at every call,
so there would be no fixed point to find. Every dropout here therefore holds a
mask that is drawn **once per segment, outside the solver**, by an explicit
call, and is reused unchanged by every call of ``f`` until the next draw:

    * :class:`VariationalDropout` (locked dropout; Gal and Ghahramani, 2016):
      one Bernoulli mask per sequence and channel, shared over time. The model
      calls ``drop.reset(reference)`` at the start of each forward (segment);
      ``drop(x)`` then multiplies by that mask however many times it is called.
    * :class:`WeightDropout` (DropConnect on a weight; Wan et al., 2013, as used
      by Merity et al., 2018 "AWD-LSTM" and Bai et al., 2019 "TrellisNet"): a
      parametrization ``w -> w * mask`` with the same ``reset`` contract.
    * :func:`embedding_dropout` (drops whole words of the embedding matrix) and
      :func:`locked_dropout` are applied once per forward, outside ``f``, so
      they draw their mask on the call.

All of them are the identity in eval mode (``module.eval()`` or
``training=False``) and when ``p == 0``; surviving entries are scaled by
``1 / (1 - p)`` so the expectation is unchanged.

The contract, for a model that owns a DEQ layer::

    def forward(self, tokens):
        x = self.embed(tokens)                       # (B, C, L)
        self.hidden_drop.reset(x_like_the_state)     # once per segment, outside the solver
        z = self.deq(x)                              # f uses self.hidden_drop(...) freely
        ...

Calling a :class:`VariationalDropout` or :class:`WeightDropout` in training
mode before any ``reset`` raises ``RuntimeError`` rather than silently dropping
nothing or drawing a mask inside the solver.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["VariationalDropout", "WeightDropout", "apply_weight_dropout", "dropconnect", "embedding_dropout",
           "embedding_dropout_mask", "locked_dropout"]


def _check_p(p: float) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
    return float(p)


def _bernoulli_mask(shape: list[int] | tuple[int, ...], p: float, *, like: Tensor) -> Tensor:
    """Entries 0 with probability p, else 1 / (1 - p); dtype and device of ``like``."""
    # Draw in float32 (bernoulli on half/bfloat16 is not supported on every device), then cast.
    # ``bernoulli_(q)`` takes the keep probability as its argument: the tensor's
    # own values are ignored (``bernoulli_()`` would keep with probability 0.5).
    keep = torch.empty(tuple(shape), dtype=torch.float32, device=like.device).bernoulli_(1.0 - p)
    return keep.div_(1.0 - p).to(like.dtype)


class VariationalDropout(nn.Module):
    """Variational (locked) dropout: one mask per sequence, shared over time and over calls.

    For an input ``x`` of shape ``(B, C, L)`` (with ``time_dim=-1``) the mask
    ``m`` has shape ``(B, C, 1)``, entries ``0`` with probability ``p`` and
    ``1 / (1 - p)`` otherwise, and ``forward(x) = x * m``: the same channels
    of a sequence are dropped at every time step. The mask is drawn by
    :meth:`reset` and kept until the next :meth:`reset`, so every call inside
    one segment (all solver iterations of a DEQ, the re-attached call and the
    backward pass) sees the same mask, and each segment gets a new one.

    Args:
        p: drop probability in ``[0, 1)``; 0 makes the module the identity.
        time_dim: the dimension the mask is shared over (``-1`` for ``(B, C, L)``,
            ``1`` for ``(B, L, C)``).

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.

    Example:
        >>> drop = VariationalDropout(0.3)
        >>> h = torch.randn(4, 8, 20)
        >>> drop.reset(h)                  # once per segment, outside the solver
        >>> torch.equal(drop(h), drop(h))  # the same mask on every call
        True

    References:
        Gal and Ghahramani, A Theoretically Grounded Application of Dropout in
        Recurrent Neural Networks (NeurIPS 2016).
    """

    mask: Tensor | None

    def __init__(self, p: float = 0.0, *, time_dim: int = -1):
        super().__init__()
        self.p = _check_p(p)
        self.time_dim = int(time_dim)
        self.mask = None

    def extra_repr(self) -> str:
        return f"p={self.p}, time_dim={self.time_dim}"

    def reset(self, reference: Tensor) -> None:
        """Draw a new mask for inputs shaped like ``reference`` (start of a segment).

        In eval mode, or with ``p == 0``, this clears the mask and draws nothing
        (no random numbers are consumed).

        Args:
            reference: a tensor with the shape, dtype and device of the inputs
                the mask will multiply; its values are not read. Its size along
                ``time_dim`` is irrelevant (the mask has size 1 there).
        """
        if not self.training or self.p == 0.0:
            self.mask = None
            return
        shape = list(reference.shape)
        shape[self.time_dim] = 1
        self.mask = _bernoulli_mask(shape, self.p, like=reference)

    def forward(self, x: Tensor) -> Tensor:
        """``x * mask`` in training mode; ``x`` in eval mode or with ``p == 0``.

        Args:
            x: a tensor whose shape matches the :meth:`reset` reference except
                (possibly) along ``time_dim``.

        Raises:
            RuntimeError: training mode and :meth:`reset` was not called since
                the module was built or put in training mode.
            ValueError: ``x`` does not match the mask's shape.
        """
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None:
            raise RuntimeError("VariationalDropout: no mask drawn; call reset(reference) once per segment, "
                               "outside the solver, before calling the module in training mode")
        expect = list(self.mask.shape)
        got = list(x.shape)
        if len(got) != len(expect):
            raise ValueError(f"VariationalDropout: input of shape {tuple(got)} does not match the mask of "
                             f"shape {tuple(expect)} drawn by reset()")
        got[self.time_dim] = 1
        if got != expect:
            raise ValueError(f"VariationalDropout: input of shape {tuple(x.shape)} does not match the mask of "
                             f"shape {tuple(expect)} drawn by reset() (only dim {self.time_dim} may differ)")
        return x * self.mask


def locked_dropout(x: Tensor, p: float, *, time_dim: int = -1, training: bool = True) -> Tensor:
    """One-shot variational dropout: a fresh mask shared over ``time_dim``.

    For dropouts applied once per forward, outside the equilibrium function
    (input dropout on embeddings, output dropout before the decoder). Inside
    ``f`` use :class:`VariationalDropout`, whose mask survives across calls.

    Args:
        x: input, e.g. ``(B, C, L)``.
        p: drop probability in ``[0, 1)``.
        time_dim: dimension the mask is shared over.
        training: when False, returns ``x`` unchanged.

    Returns:
        ``x * m`` with ``m`` of the shape of ``x`` but size 1 along ``time_dim``.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    p = _check_p(p)
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shape[time_dim] = 1
    return x * _bernoulli_mask(shape, p, like=x)


def embedding_dropout_mask(input: Tensor, num_embeddings: int, p: float, *, training: bool = True,
                           dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Per-token scale of embedding (word) dropout: whole vocabulary rows dropped.

    One Bernoulli draw per vocabulary entry, ``0`` with probability ``p`` and
    ``1 / (1 - p)`` otherwise, gathered at the token ids: a dropped word is
    zero at every position of the batch. Multiplying the looked-up embeddings
    by this scale equals looking up in ``weight * row_mask`` (Merity et al.,
    2018; Gal and Ghahramani, 2016), with the same gradient, without
    materialising a masked copy of the (possibly very large) weight.

    Args:
        input: token ids, any shape ``S``.
        num_embeddings: vocabulary size.
        p: drop probability in ``[0, 1)``.
        training: when False (or ``p == 0``) returns ``None`` (no dropout).
        dtype: dtype of the returned scale.

    Returns:
        ``None`` or a tensor of shape ``S + (1,)`` to multiply the embeddings with.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    p = _check_p(p)
    if not training or p == 0.0:
        return None
    rows = torch.empty((num_embeddings,), dtype=torch.float32, device=input.device).bernoulli_(1.0 - p)
    return rows.div_(1.0 - p).to(dtype)[input].unsqueeze(-1)


def embedding_dropout(input: Tensor, weight: Tensor, p: float, *, training: bool = True) -> Tensor:
    """Embedding lookup with embedding (word) dropout.

    ``out = (weight * r)[input]`` with ``r`` a ``(num_embeddings, 1)`` mask:
    each vocabulary word is dropped entirely, with probability ``p``, for the
    whole batch, and surviving rows are scaled by ``1 / (1 - p)`` (the
    ``dropoute`` of AWD-LSTM and TrellisNet).

    Args:
        input: token ids, any shape ``S`` (LongTensor).
        weight: ``(num_embeddings, D)`` embedding matrix (may be tied to a decoder).
        p: drop probability in ``[0, 1)``.
        training: when False, a plain lookup.

    Returns:
        ``S + (D,)`` embeddings.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.

    References:
        Merity, Keskar, Socher, Regularizing and Optimizing LSTM Language Models (ICLR 2018).
    """
    out = F.embedding(input, weight)
    scale = embedding_dropout_mask(input, weight.shape[0], p, training=training, dtype=out.dtype)
    return out if scale is None else out * scale


def dropconnect(weight: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Apply a DropConnect keep mask: ``weight * mask * scale`` on the entries the mask covers.

    A mask of the weight's shape covers every entry. A mask one tap short in
    the last dim (``(..., k - 1)`` for a ``(..., k)`` kernel) is temporal
    DropConnect: it covers the taps on earlier time steps, and the last tap
    (the current time step) is kept whole and unscaled, as in the TrellisNet
    code. The map is diagonal, so it is its own adjoint: it also maps a
    gradient with respect to the dropped weight to one with respect to ``weight``.

    Args:
        weight: ``(..., k)``.
        mask: bool, ``weight.shape`` or ``weight.shape[:-1] + (k - 1,)``.
        scale: ``1 / (1 - p)``.

    Raises:
        ValueError: a mask of any other shape.
    """
    if mask.shape == weight.shape:
        return weight * mask * scale
    if mask.shape == (*weight.shape[:-1], weight.shape[-1] - 1):
        return torch.cat([weight[..., :-1] * mask * scale, weight[..., -1:]], dim=-1)
    raise ValueError(f"DropConnect: weight of shape {tuple(weight.shape)} does not match the mask of shape "
                     f"{tuple(mask.shape)} drawn by reset()")


class WeightDropout(nn.Module):
    """DropConnect on a weight, as a parametrization ``w -> w * mask / (1 - p)`` held fixed per segment.

    Register it on a module's weight with :func:`apply_weight_dropout` (after
    weight normalisation, if any, so the normalised weight is dropped). Each
    entry of the weight is kept with probability ``1 - p`` and kept entries are
    scaled by ``1 / (1 - p)``. The mask is drawn by :meth:`reset` once per
    segment and reused by every evaluation of the weight until the next
    :meth:`reset`. It is held as a bool keep mask ``mask`` (one byte per entry,
    a quarter of a float32 mask: a weight-sized mask costs as much memory as
    the weight itself); see :func:`dropconnect`.

    With ``temporal=True`` (TrellisNet's default, Bai et al. 2019) only the
    kernel taps that look at earlier time steps are dropped: for a
    ``(C_out, C_in, k)`` convolution weight with ``k > 1`` the last tap
    ``[..., k - 1]`` (the current time step) is kept whole and unscaled, as in
    the TrellisNet code, and the mask covers the other taps only
    (``(C_out, C_in, k - 1)``); a weight with ``k == 1`` or fewer than 3 dims
    is dropped entirely.

    Args:
        p: drop probability in ``[0, 1)``.
        temporal: drop only the taps on earlier time steps (see above).

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """

    mask: Tensor | None

    def __init__(self, p: float = 0.0, *, temporal: bool = True):
        super().__init__()
        self.p = _check_p(p)
        self.temporal = bool(temporal)
        self.mask = None

    def extra_repr(self) -> str:
        return f"p={self.p}, temporal={self.temporal}"

    def reset(self, reference: Tensor) -> None:
        """Draw a new mask for a weight shaped like ``reference`` (start of a segment).

        In eval mode, or with ``p == 0``, clears the mask and draws nothing.

        Args:
            reference: a tensor with the weight's shape and device (e.g. the
                weight-norm direction ``v``); its values are not read.
        """
        if not self.training or self.p == 0.0:
            self.mask = None
            return
        shape = list(reference.shape)
        if self.temporal and reference.dim() >= 3 and shape[-1] > 1:
            shape[-1] -= 1  # the current-time tap is never dropped: no mask for it
        # bernoulli_(q) keeps with probability q (bernoulli_() would keep half), drawn in float32.
        keep = torch.empty(shape, dtype=torch.float32, device=reference.device).bernoulli_(1.0 - self.p)
        self.mask = keep.bool()

    def factors(self) -> tuple[Tensor, float] | None:
        """``(mask, 1 / (1 - p))`` in training mode with ``p > 0`` (see :func:`dropconnect`), else ``None``.

        Raises:
            RuntimeError: training mode and :meth:`reset` was not called.
        """
        if not self.training or self.p == 0.0:
            return None
        if self.mask is None:
            raise RuntimeError("WeightDropout: no mask drawn; call reset(weight) once per segment, outside the "
                               "solver, before evaluating the weight in training mode")
        return self.mask, 1.0 / (1.0 - self.p)

    def forward(self, weight: Tensor) -> Tensor:
        """The dropped weight (:func:`dropconnect`) in training mode, ``weight`` otherwise.

        Raises:
            RuntimeError: training mode and :meth:`reset` was not called.
            ValueError: the weight's shape does not fit the mask's.
        """
        factors = self.factors()
        return weight if factors is None else dropconnect(weight, *factors)


def apply_weight_dropout(module: nn.Module, name: str = "weight", *, p: float,
                         temporal: bool = True) -> WeightDropout:
    """Register :class:`WeightDropout` as a parametrization of ``module.<name>``.

    Appended to any existing parametrizations of that tensor (e.g. weight
    norm), so ``module.<name>`` becomes ``dropout(weight_norm(g, v))``.

    Args:
        module: the module holding the weight.
        name: the weight's attribute name.
        p: drop probability in ``[0, 1)``.
        temporal: see :class:`WeightDropout`.

    Returns:
        The registered :class:`WeightDropout`; call its ``reset`` once per segment.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    drop = WeightDropout(p, temporal=temporal)
    # unsafe=True: the safe path evaluates the parametrization at registration,
    # which in training mode would (correctly) raise for want of a mask.
    parametrize.register_parametrization(module, name, drop, unsafe=True)
    return drop
