"""The copy-memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016), as used by
the TCN benchmark (Bai, Kolter, Koltun 2018) and the DEQ paper (Bai, Kolter, Koltun 2019).

Alphabet (vocabulary size 10): blank ``0``, symbols ``1..8``, delimiter ``9``.
With ``n = n_symbols_to_copy`` (default 10) and ``T = blank_len``, every
sequence has length ``L = T + 2n`` and, position by position::

    positions     0 .. n-1      n .. n+T-2     n+T-1        n+T .. T+2n-1
    input         s_1 .. s_n    0 ... 0        9            0 ... 0
    target        0 ... 0       0 ... 0        0            s_1 .. s_n

i.e. ``input = s + [0] * (T - 1) + [9] + [0] * n`` and
``target = [0] * (T + n) + s``, where ``s`` holds ``n`` symbols drawn
uniformly from ``1..8``. The model reads the symbols, waits ``T`` steps, sees
the delimiter and must output the symbols in order.

With ``repeat_delimiter=True`` the last ``n + 1`` input positions are all
``9`` instead of ``9`` followed by blanks: the layout written in the TCN paper
and its code. The target is the same.

Accuracy is measured only on the ``n`` positions that must be recalled (the
last ``n``): the fraction of those predicted exactly. Predicting blanks
everywhere therefore scores about 1/8, not ``(T + n) / (T + 2n)``. The loss is
usually cross-entropy over all ``L`` positions, as in the TCN code; the
memoryless baseline of that loss is ``n * log(8) / (T + 2n)``.

Batches are a pure function of ``(seed, index)``: batch ``i`` is drawn from a
``torch.Generator`` seeded from ``numpy.random.SeedSequence([seed, i])``, so
any batch can be rebuilt and training resumes exactly with ``start=``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

BLANK = 0
DELIMITER = 9
FIRST_SYMBOL, LAST_SYMBOL = 1, 8
VOCAB_SIZE = 10


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def copy_memory_batch(batch_size: int, *, blank_len: int, n_symbols_to_copy: int = 10,
                      repeat_delimiter: bool = False,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One batch of copy-memory sequences (layout in the module docstring).

    Args:
        batch_size: number of sequences ``B``.
        blank_len: ``T``, the waiting time between the last symbol and the
            delimiter is ``T - 1`` blanks; at least 1.
        n_symbols_to_copy: ``n``, symbols to memorise and recall.
        repeat_delimiter: fill the recall phase of the input with ``9`` (TCN
            layout) instead of blanks.
        generator: source of randomness (the global one when ``None``).

    Returns:
        ``(input, target)``, each ``(B, T + 2n)`` int64.

    Raises:
        ValueError: a size below its minimum.

    Example:
        >>> x, y = copy_memory_batch(2, blank_len=3, n_symbols_to_copy=2, generator=torch.Generator().manual_seed(0))
        >>> x.shape, y.shape
        (torch.Size([2, 7]), torch.Size([2, 7]))
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("blank_len", blank_len, 1)
    _check_int("n_symbols_to_copy", n_symbols_to_copy, 1)
    n, t = n_symbols_to_copy, blank_len
    symbols = torch.randint(FIRST_SYMBOL, LAST_SYMBOL + 1, (batch_size, n), generator=generator,
                            dtype=torch.long)
    x = torch.full((batch_size, t + 2 * n), BLANK, dtype=torch.long)
    x[:, :n] = symbols
    if repeat_delimiter:
        x[:, n + t - 1:] = DELIMITER
    else:
        x[:, n + t - 1] = DELIMITER
    y = torch.full((batch_size, t + 2 * n), BLANK, dtype=torch.long)
    y[:, t + n:] = symbols
    return x, y


def recall_accuracy(prediction: Tensor, target: Tensor, *, n_symbols_to_copy: int = 10) -> float:
    """Fraction of the recalled symbols (the last ``n`` positions) predicted exactly.

    Args:
        prediction: ``(B, L)`` predicted ids, or ``(B, L, V)`` logits (argmax taken).
        target: ``(B, L)`` target ids.
        n_symbols_to_copy: ``n``, the number of recall positions at the end.

    Returns:
        Accuracy in ``[0, 1]`` over ``B * n`` positions.

    Raises:
        ValueError: shapes that do not match, or ``n`` larger than ``L``.
    """
    if prediction.dim() == 3:
        prediction = prediction.argmax(dim=-1)
    if prediction.shape != target.shape or target.dim() != 2:
        raise ValueError(f"prediction {tuple(prediction.shape)} (after argmax over logits) and target "
                         f"{tuple(target.shape)} must both be (B, L)")
    _check_int("n_symbols_to_copy", n_symbols_to_copy, 1)
    if n_symbols_to_copy > target.shape[1]:
        raise ValueError(f"n_symbols_to_copy={n_symbols_to_copy} exceeds the sequence length {target.shape[1]}")
    hit = prediction[:, -n_symbols_to_copy:] == target[:, -n_symbols_to_copy:]
    return hit.double().mean().item()


class CopyMemory:
    """A fixed, reproducible sequence of copy-memory batches.

    Iterating yields batches ``start, ..., n_batches - 1``; batch ``i`` depends
    only on ``(seed, i)`` (see :meth:`batch`). Use different seeds for the
    training and evaluation sets.

    Args:
        blank_len: ``T`` (sequence length is ``T + 2 * n_symbols_to_copy``).
        batch_size: sequences per batch ``B``.
        n_batches: batches per pass.
        n_symbols_to_copy: ``n``, default 10 as in the TCN and DEQ papers.
        repeat_delimiter: TCN input layout (see the module docstring).
        seed: non-negative integer.
        start: first batch index yielded, for exact resume.

    Raises:
        ValueError: a size below its minimum, a negative seed, ``start`` out
            of ``[0, n_batches]``.

    Example:
        >>> data = CopyMemory(blank_len=100, batch_size=32, n_batches=500, seed=0)
        >>> x, y = next(iter(data)); x.shape
        torch.Size([32, 120])
    """

    vocab_size = VOCAB_SIZE

    def __init__(self, *, blank_len: int, batch_size: int, n_batches: int, n_symbols_to_copy: int = 10,
                 repeat_delimiter: bool = False, seed: int = 0, start: int = 0) -> None:
        _check_int("blank_len", blank_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("n_batches", n_batches, 1)
        _check_int("n_symbols_to_copy", n_symbols_to_copy, 1)
        _check_int("seed", seed, 0)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n_batches:
            raise ValueError(f"start must be an int in [0, {n_batches}] (n_batches), got {start!r}")
        self.blank_len = blank_len
        self.batch_size = batch_size
        self.n_batches = n_batches
        self.n_symbols_to_copy = n_symbols_to_copy
        self.repeat_delimiter = repeat_delimiter
        self.seed = seed
        self.start = start

    @property
    def seq_len(self) -> int:
        """``L = blank_len + 2 * n_symbols_to_copy``."""
        return self.blank_len + 2 * self.n_symbols_to_copy

    def __len__(self) -> int:
        """Batches iteration yields: ``n_batches - start``."""
        return self.n_batches - self.start

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        """Batch ``index`` (absolute, ignoring ``start``), a pure function of ``(seed, index)``.

        Raises:
            IndexError: ``index`` outside ``[0, n_batches)``.
        """
        if not 0 <= index < self.n_batches:
            raise IndexError(f"batch {index} out of range [0, {self.n_batches})")
        # SeedSequence mixes (seed, index) into well-separated streams; seed + index would make
        # batch 1 of seed 0 equal batch 0 of seed 1.
        state = np.random.SeedSequence([self.seed, index]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        return copy_memory_batch(self.batch_size, blank_len=self.blank_len,
                                 n_symbols_to_copy=self.n_symbols_to_copy,
                                 repeat_delimiter=self.repeat_delimiter, generator=generator)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(self.start, self.n_batches):
            yield self.batch(i)

    def __repr__(self) -> str:
        return (f"CopyMemory(blank_len={self.blank_len}, batch_size={self.batch_size}, n_batches={self.n_batches}, "
                f"n_symbols_to_copy={self.n_symbols_to_copy}, repeat_delimiter={self.repeat_delimiter}, "
                f"seed={self.seed}, start={self.start})")
