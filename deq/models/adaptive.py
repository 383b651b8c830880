"""Adaptive input embedding and an adaptive softmax tied to it.

Large vocabularies (WikiText-103 has 267,735 words) are split by frequency into
clusters at ``cutoffs``: ids ``[0, c_1)`` are the head (the shortlist), ids
``[c_i, c_{i+1})`` form tail cluster ``i``. Frequent words get wide vectors, rare
words narrow ones: cluster ``i`` has dimension ``d_embed // div_val**i``, projected
to (embedding) or from (softmax) the model width ``d_model``.

- :class:`AdaptiveEmbedding`: adaptive input representations (Baevski & Auli,
  2019), in the parametrisation of Transformer-XL (Dai et al., 2019): one table
  and one projection ``(d_model, d_i)`` per cluster, output scaled by
  ``sqrt(d_model)``.
- :class:`TiedAdaptiveLogSoftmax`: the adaptive softmax (Grave et al., 2017) in
  Transformer-XL's projected form, with its cluster weights (and, per cluster,
  its projections) tied to an :class:`AdaptiveEmbedding`. This is the piece
  ``torch.nn.AdaptiveLogSoftmaxWithLoss`` lacks: it owns its weights and has no
  projections, so it cannot share them with an embedding.
- :class:`AdaptiveSoftmax`: the output layer a language model holds. Tied, it
  is a :class:`TiedAdaptiveLogSoftmax`; untied, it is
  ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (with cutoffs) or a full softmax
  ``nn.Linear`` (without). All three give per-token negative log-likelihoods,
  so that callers sum them for an exact perplexity.

With ``cutoffs=()`` (PTB: 10k words) there is one cluster and the tied adaptive
softmax is the ordinary tied full softmax ``log_softmax(h E^T + b)`` (through the
projection when ``d_embed != d_model``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdaptiveEmbedding", "AdaptiveSoftmax", "TiedAdaptiveLogSoftmax"]


def _cluster_bounds(n_token: int, cutoffs: Sequence[int]) -> tuple[int, ...]:
    """``(0, c_1, ..., c_k, n_token)`` after checking ``cutoffs``."""
    cutoffs = list(cutoffs)
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cutoffs):
        raise TypeError(f"cutoffs must be integers, got {cutoffs!r}")
    if cutoffs != sorted(set(cutoffs)) or (cutoffs and (cutoffs[0] <= 0 or cutoffs[-1] >= n_token)):
        raise ValueError(f"cutoffs must be strictly increasing integers in (0, n_token={n_token}), "
                         f"got {cutoffs!r}")
    return (0, *cutoffs, n_token)


class AdaptiveEmbedding(nn.Module):
    """Adaptive input embedding: per-cluster tables of shrinking width, projected.

    For a token ``t`` in cluster ``i`` (``bounds[i] <= t < bounds[i+1]``)::

        emb(t) = sqrt(d_model) * P_i E_i[t - bounds[i]]

    with ``E_i`` of shape ``(bounds[i+1] - bounds[i], d_embed // div_val**i)`` and
    ``P_i`` of shape ``(d_model, d_embed // div_val**i)``. With ``div_val == 1``
    there is a single table over the whole vocabulary and a single projection,
    omitted (identity) when ``d_embed == d_model``. With ``div_val > 1`` every
    cluster has its projection, the head's included even when it is square
    (as in Transformer-XL, whose parameter counts the presets reproduce).

    Args:
        n_token: vocabulary size.
        d_embed: width of the head cluster's vectors.
        d_model: output width.
        cutoffs: cluster boundaries, strictly increasing in ``(0, n_token)``;
            empty for a single cluster.
        div_val: width divisor per cluster (``>= 1``).
        init_std: standard deviation of the normal initialisation of tables and
            projections (0.01 in the DEQ-Transformer code).

    Raises:
        ValueError: bad cutoffs, ``div_val < 1``, or a cluster width that would be 0.

    Example:
        >>> emb = AdaptiveEmbedding(1000, d_embed=64, d_model=64, cutoffs=[100, 500], div_val=4)
        >>> emb(torch.randint(0, 1000, (2, 7))).shape
        torch.Size([2, 7, 64])

    References:
        Baevski & Auli, Adaptive Input Representations for Neural Language Modeling (ICLR 2019);
        Dai et al., Transformer-XL (ACL 2019).
    """

    def __init__(self, n_token: int, *, d_embed: int, d_model: int, cutoffs: Sequence[int] = (),
                 div_val: int = 1, init_std: float = 0.01):
        super().__init__()
        if not isinstance(div_val, int) or isinstance(div_val, bool) or div_val < 1:
            raise ValueError(f"div_val must be an integer >= 1, got {div_val!r}")
        if d_embed < 1 or d_model < 1:
            raise ValueError(f"d_embed and d_model must be >= 1, got {d_embed} and {d_model}")
        self.n_token, self.d_embed, self.d_model, self.div_val = n_token, d_embed, d_model, div_val
        self.bounds = _cluster_bounds(n_token, cutoffs)
        self.cutoffs = tuple(self.bounds[1:-1])
        self.scale = math.sqrt(d_model)
        n_clusters = len(self.bounds) - 1
        if div_val == 1:
            self.cluster_dims = (d_embed,) * n_clusters
            self.emb_layers = nn.ModuleList([nn.Embedding(n_token, d_embed)])
            projs = [] if d_embed == d_model else [nn.Parameter(torch.empty(d_model, d_embed))]
        else:
            self.cluster_dims = tuple(d_embed // div_val ** i for i in range(n_clusters))
            if min(self.cluster_dims) < 1:
                raise ValueError(f"d_embed={d_embed} with div_val={div_val} gives a cluster of width 0 "
                                 f"(widths {self.cluster_dims}); use fewer cutoffs or a smaller div_val")
            self.emb_layers = nn.ModuleList(
                [nn.Embedding(hi - lo, d) for lo, hi, d in zip(self.bounds, self.bounds[1:], self.cluster_dims)])
            projs = [nn.Parameter(torch.empty(d_model, d)) for d in self.cluster_dims]
        self.emb_projs = nn.ParameterList(projs)
        for layer in self.emb_layers:
            nn.init.normal_(layer.weight, 0.0, init_std)
        for p in self.emb_projs:
            nn.init.normal_(p, 0.0, init_std)

    @property
    def n_clusters(self) -> int:
        return len(self.bounds) - 1

    def cluster_weight(self, i: int) -> Tensor:
        """``E_i``, the ``(bounds[i+1] - bounds[i], cluster_dims[i])`` vectors of cluster ``i``."""
        if self.div_val == 1:
            return self.emb_layers[0].weight[self.bounds[i]:self.bounds[i + 1]]
        return self.emb_layers[i].weight

    def proj(self, i: int) -> nn.Parameter | None:
        """``P_i`` (``(d_model, cluster_dims[i])``), or ``None`` where it is the identity."""
        if len(self.emb_projs) == 0:
            return None
        return self.emb_projs[0 if self.div_val == 1 else i]

    def forward(self, tokens: Tensor) -> Tensor:
        """Embed token ids.

        Args:
            tokens: ``(...)`` integer ids in ``[0, n_token)``.

        Returns:
            ``(..., d_model)`` embeddings, scaled by ``sqrt(d_model)``.
        """
        if self.div_val == 1:
            emb = self.emb_layers[0](tokens)
            if len(self.emb_projs):
                emb = F.linear(emb, self.emb_projs[0])
            return emb * self.scale
        flat = tokens.reshape(-1)
        pieces = []
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel():
                pieces.append((idx, F.linear(self.emb_layers[i](flat.index_select(0, idx) - lo), self.emb_projs[i])))
        # Allocated after the lookups so that it takes their dtype (autocast included).
        like = pieces[0][1] if pieces else self.emb_projs[0]
        out = like.new_zeros(flat.numel(), self.d_model)
        for idx, emb_i in pieces:
            out = out.index_copy(0, idx, emb_i)
        return (out * self.scale).view(*tokens.shape, self.d_model)


def _log_softmax(logits: Tensor) -> Tensor:
    """log_softmax in float32 or wider: NLLs are summed over a corpus for perplexity."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _tie_flags(tie_projs: bool | Sequence[bool], n_clusters: int) -> tuple[bool, ...]:
    if isinstance(tie_projs, bool):
        return (tie_projs,) * n_clusters
    flags = tuple(tie_projs)
    if len(flags) != n_clusters or not all(isinstance(t, bool) for t in flags):
        raise ValueError(f"tie_projs must be a bool or {n_clusters} bools (one per cluster), got {tie_projs!r}")
    return flags


class TiedAdaptiveLogSoftmax(nn.Module):
    """Adaptive log-softmax whose cluster weights are those of an :class:`AdaptiveEmbedding`.

    With ``h`` of width ``d_model``, ``h_i = P_i^T h`` (``h`` itself where the
    embedding has no projection), the head scores the shortlist and one logit
    per tail cluster, and tail cluster ``i`` scores its own words::

        head(h)  = log_softmax([E_0 h_0 + b_0 ; C h_0 + c])        (c_1 + k entries)
        log p(t) = head(h)[t]                                       t in the head
        log p(t) = head(h)[c_1 + i - 1] + log_softmax(E_i h_i + b_i)[t - c_i]   t in tail cluster i

    ``E_i`` are the embedding's tables (always tied, shared ``nn.Parameter``
    objects); ``P_i`` is the embedding's projection where ``tie_projs[i]`` and a
    projection of its own otherwise; ``b_i``, the cluster vectors ``C``
    ``(k, cluster_dims[0])`` and ``c`` ``(k,)`` belong to the softmax. With no
    cutoffs it is the tied full softmax. Tail logits are computed only for the
    rows whose target lies in that tail.

    Args:
        embedding: the embedding to tie to.
        tie_projs: share the embedding's projections: one bool for all clusters
            or one per cluster (Transformer-XL's WikiText-103 setting is
            ``(False, True, True, True)``). Ignored where the embedding has no
            projection. With ``div_val == 1`` every cluster uses the embedding's
            single projection when tied.
        init_std: normal initialisation of the cluster vectors and untied
            projections; biases start at 0.

    Raises:
        ValueError: ``tie_projs`` of the wrong length.

    Example:
        >>> emb = AdaptiveEmbedding(1000, d_embed=64, d_model=64, cutoffs=[100, 500], div_val=4)
        >>> crit = TiedAdaptiveLogSoftmax(emb, tie_projs=True)
        >>> crit(torch.randn(5, 64), torch.randint(0, 1000, (5,))).shape
        torch.Size([5])

    References:
        Grave et al., Efficient softmax approximation for GPUs (ICML 2017);
        Dai et al., Transformer-XL (ACL 2019).
    """

    def __init__(self, embedding: AdaptiveEmbedding, *, tie_projs: bool | Sequence[bool] = True,
                 init_std: float = 0.01):
        super().__init__()
        emb = embedding
        self.n_token, self.d_model, self.bounds = emb.n_token, emb.d_model, emb.bounds
        self.cluster_dims = emb.cluster_dims
        self.tie_projs = _tie_flags(tie_projs, emb.n_clusters)
        self.shortlist = self.bounds[1]
        k = emb.n_clusters - 1
        # Tied tables are the embedding's Parameter objects: parameters() lists
        # them once, state_dict lists them under both names (as tied LM heads do).
        self.weights = nn.ParameterList([layer.weight for layer in emb.emb_layers])
        self.div_val = emb.div_val
        projs = []
        for i in range(emb.n_clusters):
            p = emb.proj(i)
            if p is None:
                break
            if self.tie_projs[i]:
                projs.append(p)
            else:
                own = nn.Parameter(torch.empty_like(p))
                nn.init.normal_(own, 0.0, init_std)
                projs.append(own)
        self.out_projs = nn.ParameterList(projs)
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(hi - lo)) for lo, hi in zip(self.bounds, self.bounds[1:])])
        if k > 0:
            self.cluster_weight = nn.Parameter(torch.empty(k, self.cluster_dims[0]))
            self.cluster_bias = nn.Parameter(torch.zeros(k))
            nn.init.normal_(self.cluster_weight, 0.0, init_std)
        else:
            self.register_parameter("cluster_weight", None)
            self.register_parameter("cluster_bias", None)

    @property
    def n_clusters(self) -> int:
        return len(self.bounds) - 1

    def _weight(self, i: int) -> Tensor:
        if self.div_val == 1:
            return self.weights[0][self.bounds[i]:self.bounds[i + 1]]
        return self.weights[i]

    def _project(self, hidden: Tensor, i: int) -> Tensor:
        if len(self.out_projs) == 0:
            return hidden
        return hidden @ self.out_projs[i]

    def _head_log_prob(self, hidden: Tensor) -> Tensor:
        weight, bias = self._weight(0), self.biases[0]
        if self.cluster_weight is not None:
            weight = torch.cat([weight, self.cluster_weight], dim=0)
            bias = torch.cat([bias, self.cluster_bias], dim=0)
        return _log_softmax(F.linear(self._project(hidden, 0), weight, bias))

    def _tail_log_prob(self, hidden: Tensor, i: int) -> Tensor:
        return _log_softmax(F.linear(self._project(hidden, i), self._weight(i), self.biases[i]))

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        """Per-token negative log-likelihood ``-log p(target | hidden)``.

        Args:
            hidden: ``(N, d_model)``.
            target: ``(N,)`` integer ids in ``[0, n_token)``.

        Returns:
            ``(N,)`` NLL in nats (sum it for the corpus NLL, average it for the loss).

        Raises:
            ValueError: shapes that do not match, or a target outside ``[0, n_token)``.
        """
        if hidden.dim() != 2 or target.shape != hidden.shape[:1] or hidden.shape[1] != self.d_model:
            raise ValueError(f"hidden must be (N, d_model={self.d_model}) and target (N,); got "
                             f"{tuple(hidden.shape)} and {tuple(target.shape)}")
        head = self._head_log_prob(hidden)
        if self.n_clusters == 1:
            if target.numel():
                lo, hi = torch.stack([target.min(), target.max()]).tolist()  # one host sync
                if lo < 0 or hi >= self.n_token:
                    raise ValueError(f"target ids must lie in [0, {self.n_token})")
            return -head.gather(1, target[:, None]).squeeze(1)
        nll = hidden.new_zeros(target.shape[0], dtype=head.dtype)
        covered = 0
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            idx = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            covered += idx.numel()
            tgt = target.index_select(0, idx)
            if i == 0:
                lp = head.index_select(0, idx).gather(1, tgt[:, None]).squeeze(1)
            else:
                tail = self._tail_log_prob(hidden.index_select(0, idx), i)
                lp = head[idx, self.shortlist + i - 1] + tail.gather(1, (tgt - lo)[:, None]).squeeze(1)
            nll = nll.index_copy(0, idx, -lp)
        if covered != target.shape[0]:
            raise ValueError(f"target ids must lie in [0, {self.n_token})")
        return nll

    def log_prob(self, hidden: Tensor) -> Tensor:
        """The full ``(N, n_token)`` log-distribution (for sampling, checks, small vocabularies).

        Args:
            hidden: ``(N, d_model)``.

        Returns:
            ``(N, n_token)`` log-probabilities; each row's exponentials sum to 1.
        """
        head = self._head_log_prob(hidden)
        parts = [head[:, :self.shortlist]]
        for i in range(1, self.n_clusters):
            parts.append(head[:, self.shortlist + i - 1, None] + self._tail_log_prob(hidden, i))
        return torch.cat(parts, dim=1)


class AdaptiveSoftmax(nn.Module):
    """A language model's output layer: per-token NLL over the vocabulary.

    - ``tie_weight=True``: :class:`TiedAdaptiveLogSoftmax` over ``embedding``
      (the tied full softmax when the embedding has no cutoffs).
    - ``tie_weight=False`` with cutoffs: ``torch.nn.AdaptiveLogSoftmaxWithLoss``
      (``div_value=div_val``, head bias on) on ``d_model`` directly, its own
      weights.
    - ``tie_weight=False`` without cutoffs: a full softmax ``nn.Linear(d_model, n_token)``.

    Log-softmaxes run in float32 or wider (under autocast too), except inside
    ``torch.nn.AdaptiveLogSoftmaxWithLoss``, which follows autocast.

    Args:
        embedding: the model's input embedding (its sizes, and its weights when tied).
        tie_weight: share the softmax's cluster weights with the embedding.
        tie_projs: see :class:`TiedAdaptiveLogSoftmax` (only used when tied).
        init_std: normal initialisation of the softmax's own weights.

    Example:
        >>> emb = AdaptiveEmbedding(100, d_embed=16, d_model=16)
        >>> out = AdaptiveSoftmax(emb, tie_weight=True)
        >>> out(torch.randn(3, 16), torch.tensor([1, 2, 3])).shape
        torch.Size([3])
    """

    def __init__(self, embedding: AdaptiveEmbedding, *, tie_weight: bool = True,
                 tie_projs: bool | Sequence[bool] = True, init_std: float = 0.01):
        super().__init__()
        self.n_token, self.d_model = embedding.n_token, embedding.d_model
        self.tie_weight = tie_weight
        if tie_weight:
            self.impl: nn.Module = TiedAdaptiveLogSoftmax(embedding, tie_projs=tie_projs, init_std=init_std)
        elif embedding.cutoffs:
            self.impl = nn.AdaptiveLogSoftmaxWithLoss(self.d_model, self.n_token, list(embedding.cutoffs),
                                                      div_value=float(embedding.div_val), head_bias=True)
        else:
            self.impl = nn.Linear(self.d_model, self.n_token)
            nn.init.normal_(self.impl.weight, 0.0, init_std)
            nn.init.zeros_(self.impl.bias)

    def forward(self, hidden: Tensor, target: Tensor) -> Tensor:
        """Per-token NLL, as :meth:`TiedAdaptiveLogSoftmax.forward`: ``(N, d_model), (N,) -> (N,)``."""
        if isinstance(self.impl, nn.AdaptiveLogSoftmaxWithLoss):
            return -self.impl(hidden, target).output
        if isinstance(self.impl, nn.Linear):
            return -_log_softmax(self.impl(hidden)).gather(1, target[:, None]).squeeze(1)
        return self.impl(hidden, target)

    def log_prob(self, hidden: Tensor) -> Tensor:
        """``(N, d_model) -> (N, n_token)`` log-probabilities."""
        if isinstance(self.impl, nn.Linear):
            return _log_softmax(self.impl(hidden))
        return self.impl.log_prob(hidden)
