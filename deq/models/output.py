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
        jac_loss: the Jacobian regulariser of the equilibrium function at
            ``z*`` (a scalar with a graph) when the forward was asked for it
            with ``jac_reg > 0``; ``None`` otherwise.
    """

    loss: Tensor | None
    nll_sum: Tensor | None
    n_tokens: int
    mems: Any
    logits: Tensor | None = None
    jac_loss: Tensor | None = None


def readout(crit, h: Tensor, target: Tensor | None, mems: Any, *, n_token: int,
            jac_loss: Tensor | None = None) -> LMOutput:
    """Score ``(B, L, D)`` hidden states with a softmax head, as both models do.

    Args:
        crit: the output layer: ``crit(flat, target)`` gives per-token NLL and
            ``crit.log_prob(flat)`` the log-probabilities, ``flat`` ``(B*L, D)``.
        h: ``(B, L, D)`` hidden states (output dropout already applied).
        target: ``(B, L)`` next-token ids, or ``None`` for log-probabilities.
        mems: passed through to the output.
        n_token: vocabulary size.
        jac_loss: passed through to the output.

    Returns:
        :class:`LMOutput`: mean and summed NLL with a target, ``logits`` without.
    """
    batch, length, width = h.shape
    flat = h.reshape(batch * length, width)
    if target is None:
        logits = crit.log_prob(flat).view(batch, length, n_token)
        return LMOutput(loss=None, nll_sum=None, n_tokens=0, mems=mems, logits=logits, jac_loss=jac_loss)
    nll_sum = crit(flat, target.reshape(-1)).sum()
    n_tokens = target.numel()
    return LMOutput(loss=nll_sum / n_tokens, nll_sum=nll_sum, n_tokens=n_tokens, mems=mems, jac_loss=jac_loss)
