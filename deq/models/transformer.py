"""DEQ-Transformer language model (Bai, Kolter, Koltun, 2019) on Transformer-XL attention.

The model is a single weight-tied Transformer-XL block ``f`` whose fixed point
over the tokens of a segment is the hidden representation::

    z* = f(z*, x),     x = (u, memory, positional embedding)

**State layout.** ``z`` is ``(B, L, d_model)``: batch first, then time, then
channels, so that ``nn.Linear`` acts on the last dimension and the DEQ solver
sees one flattened sample per row. Memory tensors are ``(B, M, ...)`` likewise.

**Once per segment, outside the solver** (in :meth:`DEQTransformerLM.forward`):
the token embedding (adaptive or plain, scaled by ``sqrt(d_model)``) with
variational dropout; the injection ``u = W_u emb + b_u`` of width
``3 * n_head * d_head`` that is added to the queries, keys and values; the
sinusoidal relative positional embedding (with a dropout mask shared over
positions); the dropout masks used inside ``f`` (hidden, attention and FFN);
and the weight-normalised weights (:func:`deq.models.weight_norm.cached_weights`).
All of these are fixed while the solver iterates and through the backward
pass, so ``f`` is one deterministic function per segment.

**The block** ``f(z, x)`` (:class:`DEQTransformerBlock`), with ``c = [mem ; z]``
(``M + L`` positions) and post-LN (the default)::

    q, k, v = split(W_qkv c + [u_mem ; u])      # q only for the L segment positions
    a_ij    = (q_i + b_w)^T k_j + (q_i + b_r)^T W_r R_{i+M-j}   (j <= i + M, else -inf)
    h       = LN(z + drop(W_o softmax(a / sqrt(d_head)) v))
    f(z, x) = LN(h + drop(W_2 drop(relu(W_1 h + b_1)) + b_2))

``R_d`` is the sinusoidal embedding of the relative distance ``d``; ``b_w`` and
``b_r`` are Transformer-XL's learned content and position biases
(``r_w_bias``, ``r_r_bias``). With ``pre_lnorm`` (as in the DEQ-Transformer
code, 2019 and 2021 alike) the attention reads ``LN([mem ; z])`` and the FFN's
residual is added to its normalised input::

    q, k, v = split(W_qkv LN([mem ; z]) + [u_mem ; u])
    h       = z + drop(W_o softmax(a / sqrt(d_head)) v)
    f(z, x) = LN(h) + drop(W_2 drop(relu(W_1 LN(h) + b_1)) + b_2)

so ``f``'s output is bounded whatever ``z`` is. LayerNorms have no affine
parameters (as in the DEQ-Transformer code): the block's scale lives in the
weight norms.

**Memory** (segment-level recurrence, Transformer-XL): after a segment, the
last ``mem_len`` positions of ``[mem ; z*]`` and of the injections
``[u_mem ; u]`` are kept, detached, as :class:`TransformerMemory`. A segment
depends on the previous ones only through that memory.

**Explicit twin**: ``model.deq.unroll_steps = n`` applies ``f`` ``n`` times from
``z = 0`` with ordinary autograd (the pretraining phase and the baseline);
``None`` switches back to the DEQ.

References:
    Bai, Kolter, Koltun, Deep Equilibrium Models (NeurIPS 2019);
    Dai et al., Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context (ACL 2019);
    Baevski & Auli, Adaptive Input Representations for Neural Language Modeling (ICLR 2019).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer import DEQLayer
from .adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from .dropout import VariationalDropout, locked_dropout
# One LMOutput and one readout for both language models (deq/models/output.py).
from .output import LMOutput, readout
from .weight_norm import apply_weight_norm, cached_weights

__all__ = ["BlockMasks", "DEQTransformerBlock", "DEQTransformerLM", "LMOutput", "TRANSFORMER_PRESETS",
           "TransformerInput", "TransformerMemory", "rel_shift", "sinusoid_embedding"]


class TransformerMemory(NamedTuple):
    """Segment-level memory handed from one segment to the next (detached).

    Attributes:
        z: ``(B, M, d_model)`` equilibria of the last ``M <= mem_len`` positions.
        u: ``(B, M, 3 * n_head * d_head)`` their injections.
    """

    z: Tensor
    u: Tensor


class BlockMasks(NamedTuple):
    """The dropout masks of one segment inside ``f`` (``None``: no dropout there), batch first.

    Attributes:
        att: ``(B, H, L, M + L)`` on the attention probabilities.
        attn_out: ``(B, 1, d_model)`` on the attention output (variational: shared over positions).
        ff_inner: ``(B, 1, d_inner)`` inside the FFN.
        ff_out: ``(B, 1, d_model)`` on the FFN output.
    """

    att: Tensor | None = None
    attn_out: Tensor | None = None
    ff_inner: Tensor | None = None
    ff_out: Tensor | None = None


class TransformerInput(NamedTuple):
    """The ``x`` of ``f(z, x)``: everything fixed for one segment.

    Attributes:
        u: ``(B, M + L, 3 * n_head * d_head)`` injections of ``[memory ; segment]``.
        mem: ``(B, M, d_model)`` memory equilibria (``M`` may be 0).
        pos: ``(M + L, d_model)`` relative positional embedding, distances
            ``M + L - 1, ..., 1, 0`` (after its dropout), shared by the batch.
        masks: this segment's dropout masks inside ``f``; ``None``: the ones the
            block's :meth:`~DEQTransformerBlock.reset_dropout` drew. Carried in
            ``x``, they are sliced with the rows of an active-set solve.
    """

    u: Tensor
    mem: Tensor
    pos: Tensor
    masks: BlockMasks | None = None

    def select_rows(self, rows: Tensor) -> "TransformerInput":
        """These inputs for the batch rows ``rows`` (``DEQLayer(compact=...)``); ``pos`` is shared."""
        masks = None if self.masks is None else BlockMasks(
            *(None if m is None else m.index_select(0, rows) for m in self.masks))
        return TransformerInput(u=self.u.index_select(0, rows), mem=self.mem.index_select(0, rows), pos=self.pos,
                                masks=masks)


def sinusoid_embedding(distances: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of (relative) positions (Vaswani et al., 2017).

    ``R_d = [sin(d w_0), ..., sin(d w_{dim/2-1}), cos(d w_0), ..., cos(d w_{dim/2-1})]``
    with ``w_k = 10000^(-2k/dim)``.

    Args:
        distances: ``(K,)`` float positions.
        dim: even embedding width.

    Returns:
        ``(K, dim)``.

    Raises:
        ValueError: odd ``dim``.
    """
    if dim % 2:
        raise ValueError(f"the sinusoidal embedding needs an even width, got {dim}")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=distances.dtype, device=distances.device) / dim))
    angles = distances[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def rel_shift(scores: Tensor) -> Tensor:
    """Transformer-XL's relative shift, from distance-indexed to key-indexed scores.

    Input ``scores[..., i, j']`` is the position term of query ``i`` against
    distance ``K - 1 - j'`` (the positional embedding is ordered ``K-1, ..., 0``).
    The output ``out[..., i, j]`` is the term for key ``j``, i.e. distance
    ``i + M - j`` with ``M = K - L``: ``out[i, j] = scores[i, j + L - 1 - i]``
    for every ``j <= i + M``. Entries with ``j > i + M`` (future keys, masked by
    the caller) hold unspecified values. Done by padding one zero column and
    re-viewing, which moves row ``i`` left by ``L - 1 - i`` without a gather.

    Args:
        scores: ``(..., L, K)`` with ``K >= L``.

    Returns:
        ``(..., L, K)``.
    """
    *lead, qlen, klen = scores.shape
    padded = torch.cat([scores.new_zeros(*lead, qlen, 1), scores], dim=-1)
    return padded.view(*lead, klen + 1, qlen)[..., 1:, :].reshape(*lead, qlen, klen)


def _dropped(t: Tensor, mask: Tensor | None) -> Tensor:
    return t if mask is None else t * mask


def _init_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, 0.0, std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class DEQTransformerBlock(nn.Module):
    """The equilibrium function: one Transformer-XL block with input injection.

    ``forward(z, x)`` computes ``f(z, x)`` as in the module docstring. Its
    dropouts hold masks drawn by :meth:`reset_dropout` (once per segment); the
    weight-normalised weights are read through PyTorch parametrizations, which
    :func:`~deq.models.weight_norm.cached_weights` evaluates once per segment.

    Args:
        d_model: state width.
        n_head: attention heads.
        d_head: width per head.
        d_inner: FFN hidden width.
        dropout: hidden and FFN dropout (variational: one mask per sequence and
            channel, shared over positions and solver iterations).
        dropatt: dropout on the attention probabilities (one mask of shape
            ``(B, n_head, L, M + L)`` per segment).
        pre_lnorm: LayerNorm before attention/FFN instead of after the residuals.
        weight_norm: weight-normalise ``W_qkv``, ``W_r``, ``W_o``, ``W_1``, ``W_2``.
        init_std: normal initialisation of the weights and the biases ``b_w``, ``b_r``.

    Raises:
        ValueError: non-positive sizes or dropout outside ``[0, 1)``.
    """

    def __init__(self, *, d_model: int, n_head: int, d_head: int, d_inner: int, dropout: float = 0.0,
                 dropatt: float = 0.0, pre_lnorm: bool = False, weight_norm: bool = True,
                 init_std: float = 0.01):
        super().__init__()
        for name, val in (("d_model", d_model), ("n_head", n_head), ("d_head", d_head), ("d_inner", d_inner)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        self.d_model, self.n_head, self.d_head, self.d_inner = d_model, n_head, d_head, d_inner
        self.pre_lnorm = pre_lnorm
        self.scale = 1.0 / math.sqrt(d_head)
        hd = n_head * d_head
        self.qkv_net = nn.Linear(d_model, 3 * hd, bias=False)
        self.r_net = nn.Linear(d_model, hd, bias=False)
        self.o_net = nn.Linear(hd, d_model)
        self.ff1 = nn.Linear(d_model, d_inner)
        self.ff2 = nn.Linear(d_inner, d_model)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head))
        for layer in (self.qkv_net, self.r_net, self.o_net, self.ff1, self.ff2):
            if weight_norm:
                # The DEQ-Transformer code's normal(0, init_std) init reaches only a
                # weight recomputed from (g, v) at every forward, so its weight-normalised
                # layers trained from PyTorch's default init; we keep that init (g = ||v||
                # per row, so the initial weight is unchanged) and zero biases.
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
                apply_weight_norm(layer, "weight", dim=0)
            else:
                _init_linear(layer, init_std)
        nn.init.normal_(self.r_w_bias, 0.0, init_std)
        nn.init.normal_(self.r_r_bias, 0.0, init_std)
        # A trailing singleton "time" dim makes the attention mask full-shape
        # (B, H, L, K): nothing is shared, yet the mask is held across f-calls.
        self.drop_att = VariationalDropout(dropatt, time_dim=-1)
        self.drop_attn_out = VariationalDropout(dropout, time_dim=1)
        self.drop_ff_inner = VariationalDropout(dropout, time_dim=1)
        self.drop_ff_out = VariationalDropout(dropout, time_dim=1)

    def reset_dropout(self, batch: int, qlen: int, klen: int, *, like: Tensor) -> None:
        """Draw this segment's dropout masks (call once per segment, outside the solver).

        Args:
            batch: ``B``.
            qlen: segment length ``L``.
            klen: ``M + L`` (memory plus segment).
            like: any tensor with the dtype and device of the state.
        """
        ref = dict(dtype=like.dtype, device=like.device)
        self.drop_att.reset(torch.empty(batch, self.n_head, qlen, klen, 1, **ref))
        self.drop_attn_out.reset(torch.empty(batch, 1, self.d_model, **ref))
        self.drop_ff_inner.reset(torch.empty(batch, 1, self.d_inner, **ref))
        self.drop_ff_out.reset(torch.empty(batch, 1, self.d_model, **ref))

    def masks(self) -> BlockMasks:
        """The masks :meth:`reset_dropout` drew, to carry in :class:`TransformerInput` (``None`` where off).

        Raises:
            RuntimeError: training mode with dropout and no :meth:`reset_dropout` since.
        """
        drops = (self.drop_att, self.drop_attn_out, self.drop_ff_inner, self.drop_ff_out)
        out = []
        for drop in drops:
            if not drop.training or drop.p == 0.0:
                out.append(None)
            elif drop.mask is None:
                raise RuntimeError("DEQTransformerBlock: no dropout masks drawn; call reset_dropout() once per "
                                   "segment, outside the solver")
            else:
                out.append(drop.mask)
        att = out[0] if out[0] is None else out[0].squeeze(-1)
        return BlockMasks(att, *out[1:])

    def _layer_norm(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.d_model,))

    def attention_scores(self, q: Tensor, k: Tensor, r: Tensor) -> Tensor:
        """Unscaled, unmasked relative attention scores ``a_ij`` (see module docstring).

        Args:
            q: ``(B, L, H, D)`` queries of the segment positions.
            k: ``(B, K, H, D)`` keys of ``[memory ; segment]``.
            r: ``(K, H, D)`` projected positional embedding for distances ``K-1, ..., 0``.

        Returns:
            ``(B, H, L, K)``: content term ``(q_i + b_w)^T k_j`` plus the shifted
            position term ``(q_i + b_r)^T r_{i+M-j}``.
        """
        content = torch.einsum("bihd,bjhd->bhij", q + self.r_w_bias, k)
        position = torch.einsum("bihd,jhd->bhij", q + self.r_r_bias, r)
        return content + rel_shift(position)

    def forward(self, z: Tensor, x: TransformerInput) -> Tensor:
        """``f(z, x)``.

        Args:
            z: ``(B, L, d_model)``.
            x: :class:`TransformerInput` with ``u`` ``(B, M + L, 3 H D)``, ``mem``
                ``(B, M, d_model)``, ``pos`` ``(M + L, d_model)``.

        Returns:
            ``(B, L, d_model)``.
        """
        u, mem, pos, masks = x
        masks = self.masks() if masks is None else masks
        batch, qlen, _ = z.shape
        mlen = mem.shape[1]
        klen = mlen + qlen
        heads, dh = self.n_head, self.d_head
        cat = torch.cat([mem, z], dim=1) if mlen else z
        if self.pre_lnorm:
            cat = self._layer_norm(cat)
        w = self.qkv_net(cat) + u
        q, k, v = w.chunk(3, dim=-1)
        q = q[:, mlen:].reshape(batch, qlen, heads, dh)
        k = k.reshape(batch, klen, heads, dh)
        v = v.reshape(batch, klen, heads, dh)
        r = self.r_net(pos).reshape(klen, heads, dh)
        scores = self.attention_scores(q, k, r) * self.scale
        # Causal: query i (absolute position M + i) sees keys j <= M + i.
        future = torch.ones(qlen, klen, dtype=torch.bool, device=z.device).triu(diagonal=1 + mlen)
        scores = scores.masked_fill(future, float("-inf"))
        prob = _dropped(F.softmax(scores, dim=-1), masks.att)
        attn = torch.einsum("bhij,bjhd->bihd", prob, v).reshape(batch, qlen, heads * dh)
        h = z + _dropped(self.o_net(attn), masks.attn_out)
        # Pre-LN adds the FFN's residual to the normalised input LN(h), not to h, as
        # the DEQ-Transformer code does (2019 and 2021): so f's output is bounded
        # whatever z is, where h + FFN(LN(h)) would carry z through unnormalised.
        h = self._layer_norm(h)
        out = h + _dropped(self.ff2(_dropped(F.relu(self.ff1(h)), masks.ff_inner)), masks.ff_out)
        return out if self.pre_lnorm else self._layer_norm(out)


class DEQTransformerLM(nn.Module):
    """DEQ-Transformer language model with adaptive (or plain tied) embedding and softmax.

    Per segment of ``L`` tokens: embed (``sqrt(d_model)``-scaled, variational
    dropout of channels, one ``(B, 1, d_model)`` mask shared over positions),
    inject, solve ``z* = f(z*, x)`` with the DEQ layer (or unroll it), apply
    output dropout (whole token positions: one ``(B, L, 1)`` mask shared over
    channels) and the softmax, and hand the memory on. These mask shapes are the
    DEQ-Transformer code's. See the module docstring for ``f``, the state layout
    and what is fixed per segment.

    Args:
        n_token: vocabulary size.
        d_model: state width.
        n_head: attention heads.
        d_head: width per head (``n_head * d_head`` need not equal ``d_model``).
        d_inner: FFN hidden width.
        dropout: embedding, hidden, FFN, positional and output dropout.
        dropatt: attention-probability dropout.
        mem_len: memory positions kept for the next segment (0: no memory). A
            plain attribute: a training script sets another value for evaluation.
        d_embed: head-cluster embedding width (default ``d_model``).
        cutoffs: adaptive cluster boundaries; empty for one cluster (full softmax).
        div_val: adaptive width divisor (1: one table over the vocabulary).
        tie_weight: tie the softmax cluster weights to the embedding.
        tie_projs: tie the softmax projections to the embedding's: a bool or one
            per cluster (see :class:`~deq.models.adaptive.TiedAdaptiveLogSoftmax`).
        pre_lnorm: pre-LayerNorm block instead of post-LayerNorm.
        weight_norm: weight-normalise the block's linear maps (not the injection).
        init_std: normal initialisation std (0.01 in the DEQ-Transformer code).
        causal: solve in the layer's causal mode (``time_dim=1``): the
            log-probability at position ``t`` depends on tokens ``<= t`` only,
            exactly, whatever the solver budget (without it, Anderson's and
            Broyden's per-sequence mixing and per-sequence stopping let later
            tokens move earlier predictions until the solve has converged).
        deq_layer: builds the DEQ layer from ``f``, e.g.
            ``functools.partial(deq.DEQLayer, solver="anderson", max_iter=30)``;
            stored as ``self.deq`` (``self.deq.f`` is the block).

    Raises:
        ValueError: invalid sizes, dropout or adaptive settings.
        TypeError: ``deq_layer`` did not return a module holding the block as ``.f``.

    Example:
        >>> model = DEQTransformerLM(**TRANSFORMER_PRESETS["tiny"])
        >>> tokens = torch.randint(0, 100, (2, 8))
        >>> out = model(tokens[:, :-1], tokens[:, 1:])
        >>> out.loss.backward()
        >>> out2 = model(tokens[:, :-1], tokens[:, 1:], mems=out.mems)   # next segment

    References:
        Bai, Kolter, Koltun, Deep Equilibrium Models (NeurIPS 2019);
        Dai et al., Transformer-XL (ACL 2019).
    """

    def __init__(self, *, n_token: int, d_model: int, n_head: int, d_head: int, d_inner: int,
                 dropout: float = 0.0, dropatt: float = 0.0, mem_len: int = 0, d_embed: int | None = None,
                 cutoffs: Sequence[int] = (), div_val: int = 1, tie_weight: bool = True,
                 tie_projs: bool | Sequence[bool] = True, pre_lnorm: bool = False, weight_norm: bool = True,
                 init_std: float = 0.01, causal: bool = True,
                 deq_layer: Callable[[nn.Module], DEQLayer] = DEQLayer):
        super().__init__()
        if not 0.0 <= dropout < 1.0 or not 0.0 <= dropatt < 1.0:
            raise ValueError(f"dropout and dropatt must be in [0, 1), got {dropout!r} and {dropatt!r}")
        if d_model % 2:
            raise ValueError(f"d_model must be even (sinusoidal positions), got {d_model}")
        self.n_token, self.d_model, self.n_head, self.d_head = n_token, d_model, n_head, d_head
        self.dropout = float(dropout)
        self.mem_len = mem_len
        self.word_emb = AdaptiveEmbedding(n_token, d_embed=d_model if d_embed is None else d_embed,
                                          d_model=d_model, cutoffs=list(cutoffs), div_val=div_val,
                                          init_std=init_std)
        self.inject = nn.Linear(d_model, 3 * n_head * d_head)
        _init_linear(self.inject, init_std)
        block = DEQTransformerBlock(d_model=d_model, n_head=n_head, d_head=d_head, d_inner=d_inner,
                                    dropout=dropout, dropatt=dropatt, pre_lnorm=pre_lnorm,
                                    weight_norm=weight_norm, init_std=init_std)
        self.deq = deq_layer(block)
        if not isinstance(self.deq, nn.Module) or getattr(self.deq, "f", None) is not block:
            raise TypeError("deq_layer(block) must return an nn.Module holding the block as .f (like deq.DEQLayer), "
                            f"got {type(self.deq).__name__}")
        self.causal = bool(causal)
        if self.causal:
            self.deq.time_dim = 1  # z is (B, L, d_model)
        self.crit = AdaptiveSoftmax(self.word_emb, tie_weight=tie_weight, tie_projs=tie_projs, init_std=init_std)

    @property
    def mem_len(self) -> int:
        return self._mem_len

    @mem_len.setter
    def mem_len(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"mem_len must be an integer >= 0, got {value!r}")
        self._mem_len = value

    @property
    def block(self) -> DEQTransformerBlock:
        """The equilibrium function ``f`` (``self.deq.f``)."""
        return self.deq.f

    def init_mems(self, batch: int) -> TransformerMemory:
        """An empty memory (``M = 0``) for the first segment."""
        ref = self.inject.weight
        hd3 = self.inject.out_features
        return TransformerMemory(z=ref.new_zeros(batch, 0, self.d_model), u=ref.new_zeros(batch, 0, hd3))

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        """Parameter count, each shared (tied) tensor once; weight-norm ``g`` and ``v`` both count.

        Args:
            non_embedding: leave out the input embedding and the output softmax:
                the tables, the embedding and softmax projections, the softmax
                biases and cluster vectors (tied ones once).

        Works on a model built on the meta device (``with torch.device("meta"):``).
        """
        total = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return total
        emb = {id(p): p for m in (self.word_emb, self.crit) for p in m.parameters()}
        return total - sum(p.numel() for p in emb.values())

    def _check_mems(self, mems: TransformerMemory, batch: int) -> TransformerMemory:
        z, u = mems
        hd3 = self.inject.out_features
        if (z.dim() != 3 or u.dim() != 3 or z.shape[0] != batch or u.shape[0] != batch or z.shape[2] != self.d_model
                or u.shape[2] != hd3 or z.shape[1] != u.shape[1]):
            raise ValueError(f"mems must be (z, u) of shapes (B={batch}, M, {self.d_model}) and (B, M, {hd3}); got "
                             f"{tuple(z.shape)} and {tuple(u.shape)}")
        return TransformerMemory(z.detach(), u.detach())

    def set_unroll_steps(self, steps: int | None) -> None:
        """Switch to the explicit weight-tied twin of ``steps`` layers, or back to the DEQ with ``None``.

        The one switch between unrolled pretraining and DEQ training.

        Raises:
            ValueError: ``steps`` neither ``None`` nor an integer ``>= 1``.
        """
        self.deq.unroll_steps = steps

    def forward(self, input: Tensor, target: Tensor | None = None, *,
                mems: TransformerMemory | None = None, mem_len: int | None = None,
                max_iter: int | None = None, jac_reg: int = 0) -> LMOutput:
        """Run one segment.

        Args:
            input: ``(B, L)`` token ids.
            target: ``(B, L)`` next-token ids, or ``None`` for no loss.
            mems: memory from the previous segment (``None``: start afresh).
            mem_len: memory positions to keep for the next segment in this call
                (default ``self.mem_len``; evaluation often uses a longer one).
            max_iter: this call's forward solver budget (see :class:`deq.DEQLayer`).
            jac_reg: Hutchinson probes of the Jacobian regulariser at ``z*``;
                with ``jac_reg > 0`` the output's ``jac_loss`` holds it.

        Returns:
            :class:`LMOutput`: ``loss`` (mean NLL over the ``B * L`` targets),
            ``nll_sum``, ``n_tokens``, ``mems`` (a :class:`TransformerMemory`, the
            last ``mem_len`` positions of ``[mems ; z*]`` and of the injections,
            detached) and, without ``target``, ``logits``: the ``(B, L, n_token)``
            next-token log-probabilities (large for big vocabularies), and
            ``jac_loss`` with ``jac_reg > 0``.

        Raises:
            ValueError: shapes of ``input``, ``target`` or ``mems`` that do not
                fit, or a negative ``mem_len``.
        """
        if input.dim() != 2:
            raise ValueError(f"input must be (B, L) token ids, got shape {tuple(input.shape)}")
        if target is not None and target.shape != input.shape:
            raise ValueError(f"target must have the shape of input {tuple(input.shape)}, got {tuple(target.shape)}")
        if mem_len is not None and (not isinstance(mem_len, int) or isinstance(mem_len, bool) or mem_len < 0):
            raise ValueError(f"mem_len must be an integer >= 0, got {mem_len!r}")
        batch, qlen = input.shape
        mems = self.init_mems(batch) if mems is None else self._check_mems(mems, batch)
        mlen = mems.z.shape[1]
        klen = mlen + qlen

        emb = locked_dropout(self.word_emb(input), self.dropout, time_dim=1, training=self.training)
        u = torch.cat([mems.u, self.inject(emb)], dim=1)
        # Positions in float32 or wider: bf16 counts integers exactly only up to 256.
        distances = torch.arange(klen - 1, -1, -1, dtype=torch.promote_types(emb.dtype, torch.float32),
                                 device=emb.device)
        pos = sinusoid_embedding(distances, self.d_model).to(emb.dtype)
        pos = locked_dropout(pos, self.dropout, time_dim=0, training=self.training)
        self.block.reset_dropout(batch, qlen, klen, like=emb)
        x = TransformerInput(u=u, mem=mems.z, pos=pos, masks=self.block.masks())
        with cached_weights(self.deq):
            z = self.deq(x, emb.new_zeros(batch, qlen, self.d_model), max_iter=max_iter, jac_reg=jac_reg)
        z, jac_loss = z if jac_reg else (z, None)

        keep = min(self.mem_len if mem_len is None else mem_len, klen)
        # clone: a slice would keep the whole segment's storage alive until the next one.
        new_mems = TransformerMemory(z=torch.cat([mems.z, z.detach()], dim=1)[:, klen - keep:].clone(),
                                     u=u.detach()[:, klen - keep:].clone())
        # Output dropout zeroes whole token positions: a (B, L, 1) mask shared over the
        # channels, as the DEQ-Transformer code's does (it drops along dim 1 of its
        # channels-first (B, d, L) state, 2019 and 2021 alike).
        h = locked_dropout(z, self.dropout, time_dim=-1, training=self.training)
        return readout(self.crit, h, target, new_mems, n_token=self.n_token, jac_loss=jac_loss)


# Presets: constructor keyword arguments. Parameter counts (tests/test_transformer.py
# checks them within 2%): "wt103_medium" 97.7M total / 71.2M non-embedding (paper: 98M;
# ~71M), "wt103_small" 4.51M non-embedding (paper: 4.5M). "Non-embedding" excludes the
# adaptive embedding, its projections and the softmax (biases, cluster vectors, untied
# projections); tied parameters are counted once.
TRANSFORMER_PRESETS: dict[str, dict] = {
    # Bai et al. 2019, WikiText-103 "medium" (DEQ-Sequence/wt103_deq_transformer.sh):
    # adaptive embedding/softmax, Transformer-XL's tie_projs for WikiText-103.
    "wt103_medium": dict(n_token=267735, d_model=700, n_head=10, d_head=70, d_inner=48000, dropout=0.05,
                         dropatt=0.0, mem_len=150, cutoffs=[20000, 40000, 200000], div_val=4, tie_weight=True,
                         tie_projs=[False, True, True, True], pre_lnorm=False, weight_norm=True),
    # Bai et al. 2019, WikiText-103 "small" (4.5M non-embedding): plain tied softmax.
    # d_inner=2500 puts the non-embedding count at 4.51M.
    "wt103_small": dict(n_token=267735, d_model=500, n_head=10, d_head=50, d_inner=2500, dropout=0.05,
                        dropatt=0.0, mem_len=150, cutoffs=[], div_val=1, tie_weight=True, tie_projs=True,
                        pre_lnorm=False, weight_norm=True),
    # Our choice for Penn Treebank (10k words; the paper reports no DEQ-Transformer on
    # PTB): tied full softmax, 10 x 40 heads, d_inner 2000: 6.90M parameters, 2.89M
    # non-embedding; Transformer-XL-like PTB dropouts and segment/memory length 70.
    "ptb": dict(n_token=10000, d_model=400, n_head=10, d_head=40, d_inner=2000, dropout=0.25, dropatt=0.1,
                mem_len=70, cutoffs=[], div_val=1, tie_weight=True, tie_projs=True, pre_lnorm=False,
                weight_norm=True),
    # CPU smoke tests and the embedded default run (a few thousand parameters).
    "tiny": dict(n_token=100, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.1, dropatt=0.0,
                 mem_len=8, cutoffs=[], div_val=1, tie_weight=True, tie_projs=True, pre_lnorm=False,
                 weight_norm=True),
}
