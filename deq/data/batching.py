"""Batching a token stream for language modelling, in order, with exact resume.

A split is one long stream of ids. :func:`batchify` cuts it into ``B``
contiguous rows (row ``b`` continues where row ``b - 1`` ends in the stream;
the last ``N mod B`` tokens are dropped). :class:`Segments` walks the columns
in order, ``tgt_len`` at a time, and yields ``(input, target)`` pairs with the
target shifted one token ahead, so a model may carry memory from one segment to
the next (Transformer-XL style). Nothing is ever shuffled.

For a ``(B, T)`` batch there are ``T - 1`` target positions per row; segment
``i`` covers input columns ``[i * tgt_len, min((i + 1) * tgt_len, T - 1))``,
so ``ceil((T - 1) / tgt_len)`` segments cover every target exactly once and
only the last may be shorter.

Perplexity over a split is ``exp(total NLL / total target tokens)``, where the
total NLL is the sum (not the mean) of the per-token negative log-likelihoods
in nats: accumulate ``loss_mean * target.numel()`` per segment, or use
``reduction="sum"``, and count ``target.numel()``.
"""

from __future__ import annotations

import math
from typing import Iterator

from torch import Tensor


def batchify(ids: Tensor, batch_size: int, *, name: str | None = None) -> Tensor:
    """Cut a 1-D id stream into ``batch_size`` contiguous rows.

    ``out[b] = ids[b * T : (b + 1) * T]`` with ``T = len(ids) // batch_size``;
    the remaining ``len(ids) mod batch_size`` tokens are dropped.

    Args:
        ids: ``(N,)`` token ids.
        batch_size: number of rows ``B``, at least 1.
        name: what ``ids`` is, for error messages, e.g.
            ``f"ptb valid split ({corpus.files['valid']})"``.

    Returns:
        ``(B, T)`` contiguous tensor (a view of ``ids`` when it is contiguous).

    Raises:
        ValueError: ``ids`` not 1-D, ``batch_size < 1``, or fewer than
            ``batch_size`` tokens.

    Example:
        >>> batchify(torch.arange(7), 2)
        tensor([[0, 1, 2],
                [3, 4, 5]])
    """
    where = "" if name is None else f"{name}: "
    if ids.dim() != 1:
        raise ValueError(f"{where}batchify expects a 1-D stream of ids, got shape {tuple(ids.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{where}batch_size must be an int >= 1, got {batch_size!r}")
    width = ids.numel() // batch_size
    if width == 0:
        raise ValueError(f"{where}cannot make {batch_size} rows from {ids.numel()} tokens "
                         f"(use a batch size of at most {ids.numel()}, or more data)")
    return ids[: width * batch_size].reshape(batch_size, width).contiguous()


class Segments:
    """Ordered ``(input, target)`` segments of a batchified stream.

    Segment ``i`` is::

        input  = data[:, i * tgt_len     : i * tgt_len + L]
        target = data[:, i * tgt_len + 1 : i * tgt_len + L + 1]

    with ``L = min(tgt_len, T - 1 - i * tgt_len)``. Iterating yields segments
    ``start, start + 1, ..., n_segments - 1``: to resume training exactly after
    ``k`` segments of an epoch, build ``Segments(data, tgt_len=..., start=k)``.
    The tensors are views of ``data`` (no copy; move ``data`` to the device once).

    Args:
        data: ``(B, T)`` ids from :func:`batchify`, ``T >= 2``.
        tgt_len: target positions per segment, at least 1.
        start: index of the first segment to yield, ``0 <= start <= n_segments``.
        name: what ``data`` is, for error messages (as in :func:`batchify`).

    Attributes:
        n_segments: segments in the whole stream, whatever ``start`` is.

    Raises:
        ValueError: ``data`` not 2-D or shorter than 2 columns, ``tgt_len < 1``,
            ``start`` out of range.

    Example:
        >>> data = batchify(corpus.train, 32)                   # doctest: +SKIP
        >>> for step, (x, y) in enumerate(Segments(data, tgt_len=70, start=k), start=k):
        ...     ...                                             # doctest: +SKIP
    """

    def __init__(self, data: Tensor, *, tgt_len: int, start: int = 0, name: str | None = None) -> None:
        if data.dim() != 2 or data.shape[1] < 2:
            where = "" if name is None else f"{name}: "
            raise ValueError(f"{where}Segments expects (B, T) data with T >= 2 (see batchify), "
                             f"got shape {tuple(data.shape)}")
        if isinstance(tgt_len, bool) or not isinstance(tgt_len, int) or tgt_len < 1:
            raise ValueError(f"tgt_len must be an int >= 1, got {tgt_len!r}")
        self.data = data
        self.tgt_len = tgt_len
        self.n_segments = math.ceil((data.shape[1] - 1) / tgt_len)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= self.n_segments:
            raise ValueError(f"start must be an int in [0, {self.n_segments}] (the number of segments), "
                             f"got {start!r}")
        self.start = start

    def __len__(self) -> int:
        """Number of segments iteration yields: ``n_segments - start``."""
        return self.n_segments - self.start

    @property
    def n_tokens(self) -> int:
        """Target tokens iteration yields (``B`` times the target columns from ``start`` on)."""
        first = self.start * self.tgt_len
        return self.data.shape[0] * max(self.data.shape[1] - 1 - first, 0)

    def segment(self, index: int) -> tuple[Tensor, Tensor]:
        """The ``(input, target)`` pair of segment ``index`` (absolute, ignoring ``start``).

        Raises:
            IndexError: ``index`` outside ``[0, n_segments)``.
        """
        if not 0 <= index < self.n_segments:
            raise IndexError(f"segment {index} out of range [0, {self.n_segments})")
        lo = index * self.tgt_len
        hi = min(lo + self.tgt_len, self.data.shape[1] - 1)
        return self.data[:, lo:hi], self.data[:, lo + 1:hi + 1]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(self.start, self.n_segments):
            yield self.segment(i)

    def __repr__(self) -> str:
        b, t = self.data.shape
        return f"Segments(B={b}, T={t}, tgt_len={self.tgt_len}, start={self.start}, n_segments={self.n_segments})"


def perplexity(total_nll: float | Tensor, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``: perplexity from a summed NLL (in nats).

    Args:
        total_nll: sum over all target tokens of ``-log p(token)``.
        n_tokens: number of target tokens summed.

    Returns:
        The perplexity as a float; ``inf`` when it overflows.

    Raises:
        ValueError: ``n_tokens < 1``.
    """
    if n_tokens < 1:
        raise ValueError(f"perplexity needs at least one target token, got n_tokens={n_tokens}")
    mean = float(total_nll) / n_tokens
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf
