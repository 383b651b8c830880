"""The output type both DEQ language models return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class LMOutput:
    """What one language-model forward over a segment returns (both DEQ language models).

    Attributes:
        loss: mean negative log-likelihood (nats) over the target tokens, a
            scalar with a graph; ``None`` without a target.
        nll_sum: summed NLL over the target tokens (for exact corpus perplexity:
            ``exp(sum nll_sum / sum n_tokens)``); ``None`` without a target.
        n_tokens: number of target tokens (0 without a target).
        mems: what the next segment needs, detached; pass it back as
            ``mems=``. Model-specific: for DEQ-TrellisNet the pair ``(h0, c0)``,
            each ``(B, nhid + nout, 1)``, the last time step of this segment's
            equilibrium; for DEQ-Transformer a ``TransformerMemory(z, u)``.
        logits: without a target, the ``(B, L, ntoken)`` next-token
            log-probabilities (normalised logits); ``None`` with a target (not
            materialised, to save memory).
    """

    loss: Tensor | None
    nll_sum: Tensor | None
    n_tokens: int
    mems: Any
    logits: Tensor | None = None
