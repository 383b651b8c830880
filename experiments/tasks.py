"""The task protocol and its two implementations: language modelling and copy memory.

A task is built by ``hydra.utils.instantiate(cfg.data, rank=..., world_size=...,
device=...)`` from a ``configs/data`` file whose ``_target_`` names the class
(config keys equal the constructor's arguments; the loop supplies this
process's rank, the number of processes and the device). It checks its
settings against the data when built, so a setting the data cannot satisfy
fails before the first step, naming the key. It provides:

* the training batches (:meth:`Task.train_batch`: batch ``i`` of the run, a
  pure function of ``i``, so the data position is one integer);
* the evaluation batches of each split, in order (:meth:`Task.eval_batches`),
  with the memory carried from one to the next where the task has one;
* its metrics (:meth:`Task.score` per batch, :meth:`Task.metrics` over a split).

Both tasks shard every batch over DDP ranks by rows
(:func:`experiments.distributed.shard_rows`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor, nn

from deq.data import CopyMemory, Segments, batchify, load_corpus

from .config import ConfigError
from .distributed import DistInfo, shard_rows

COPY_EVAL_SEED_OFFSET = 1_000_003  # copy-memory evaluation batches never coincide with training batches


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch.

    Attributes:
        input, target: ``(B_rank, L)`` token ids on the task's device.
        epoch: the pass over the training data it belongs to.
        new_sequence: nothing carries into it (the loop starts a fresh memory).
    """

    input: Tensor
    target: Tensor
    epoch: int
    new_sequence: bool


class Task(Protocol):
    """What the training loop needs from a task."""

    vocab_size: int
    eval_splits: tuple[str, ...]  # the splits that exist, e.g. ("valid", "test")

    def train_batch(self, index: int) -> Batch:
        """Training batch ``index`` (0-based count of the batches the run has consumed)."""

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """The ``(input, target)`` batches of ``split``, in order."""

    def score(self, model: nn.Module, input: Tensor, target: Tensor, *, mems: Any,
              mem_len: int | None) -> tuple[dict[str, float], Any]:
        """Run ``model`` on one evaluation batch: sums to add up over the split, and the memory to carry."""

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Metrics of a split from the summed :meth:`score` values (over all ranks)."""

    def describe(self, metrics: dict[str, float]) -> str:
        """A short human summary of :meth:`metrics` for the end-of-run report."""


def _loss_metrics(nll: float, tokens: float) -> dict[str, float]:
    if tokens < 1:
        raise ValueError("the evaluation saw no target tokens")
    loss = nll / tokens
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "n_tokens": int(tokens)}


def _check_size(key: str, value: int, *, world_size: int = 1) -> None:
    """An integer >= 1 (and, for a batch, divisible by the number of processes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError([f"{key} must be an integer >= 1, got {value!r}"])
    if value % world_size:
        raise ConfigError([f"{key}={value} must be divisible by the number of processes ({world_size})"])


class LanguageModeling:
    """Word-level language modelling on a corpus of :func:`deq.data.load_corpus`, segment by segment.

    Each split is cut into ``batch_size`` (``eval_batch_size``) contiguous rows
    and walked in order ``tgt_len`` (``eval_tgt_len``) tokens at a time, the
    memory carried from segment to segment; an epoch ends after the last
    segment and the next starts with a fresh memory. Perplexity is
    ``exp(sum NLL / sum tokens)`` over the whole split.

    Args:
        name: the corpus (``ptb``, ``wikitext-2``, ``wikitext-103``, ``ptb-sample``, ...).
        root: the directory that holds one folder per corpus.
        vocab_size: the corpus vocabulary size, checked (the model config reads it).
        batch_size, tgt_len: training rows (over all ranks) and segment length.
        eval_batch_size, eval_tgt_len: the same for evaluation.
        rank, world_size: this process's place in a DDP job (batches are sharded by rows).
        device: where batches live.

    Raises:
        FileNotFoundError: a corpus file is missing (the message gives the download command).
        ConfigError: ``vocab_size`` differs from the corpus; a split too short
            for its batch or segment length (the split and its file named);
            rows not divisible over the ranks.
    """

    def __init__(self, *, name: str, root: str, vocab_size: int, batch_size: int, tgt_len: int,
                 eval_batch_size: int, eval_tgt_len: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        info = DistInfo(rank=rank, world_size=world_size)
        _check_size("data.batch_size", batch_size, world_size=world_size)
        _check_size("data.eval_batch_size", eval_batch_size, world_size=world_size)
        _check_size("data.tgt_len", tgt_len)
        _check_size("data.eval_tgt_len", eval_tgt_len)
        corpus = load_corpus(name, root)
        if vocab_size != len(corpus.vocab):
            raise ConfigError([f"data.vocab_size={vocab_size} but the {name} corpus in {root} has "
                               f"{len(corpus.vocab)} words; set data.vocab_size={len(corpus.vocab)}"])
        self.name, self.root, self.vocab_size = name, root, vocab_size
        self.files = dict(corpus.files)
        self.eval_tgt_len = eval_tgt_len
        rows = self._rows(corpus.train, "train", "batch_size", batch_size, "tgt_len", tgt_len, info, device)
        self.segments = Segments(rows, tgt_len=tgt_len)
        self.splits: dict[str, Tensor] = {}
        for split in ("valid", "test"):
            ids = getattr(corpus, split)
            if ids is not None:
                self.splits[split] = self._rows(ids, split, "eval_batch_size", eval_batch_size, "eval_tgt_len",
                                                eval_tgt_len, info, device)
        self.eval_splits = tuple(self.splits)

    def _rows(self, ids: Tensor, split: str, batch_key: str, batch: int, len_key: str, length: int,
              info: DistInfo, device: torch.device | str) -> Tensor:
        """``ids`` batchified into ``batch`` rows (this rank's share), after checking it is long enough."""
        columns = ids.numel() // batch
        where = f"the {split} split ({self.files.get(split, Path(self.root) / self.name)}, {ids.numel()} tokens)"
        if columns < 2:
            fix = (f"so at most data.{batch_key}={ids.numel() // 2}" if ids.numel() >= 2 else
                   "and the split has fewer than 2")
            raise ConfigError([f"{where} is too short for data.{batch_key}={batch}: each row needs at least 2 "
                               f"tokens, {fix}"])
        if length > columns - 1:
            raise ConfigError([f"data.{len_key}={length} is longer than the rows of {where}: {batch} rows of "
                               f"{columns} tokens give segments of at most {columns - 1}"])
        return shard_rows(batchify(ids, batch), info, f"data.{batch_key}").to(device)

    def train_batch(self, index: int) -> Batch:
        epoch, segment = divmod(index, self.segments.n_segments)
        x, y = self.segments.segment(segment)
        return Batch(input=x, target=y, epoch=epoch, new_sequence=segment == 0)

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(Segments(self.splits[split], tgt_len=self.eval_tgt_len))

    def score(self, model: nn.Module, input: Tensor, target: Tensor, *, mems: Any,
              mem_len: int | None) -> tuple[dict[str, float], Any]:
        if mem_len is None:
            out = model(input, target, mems=mems)
        else:
            out = model(input, target, mems=mems, mem_len=mem_len)
        return {"nll": float(out.nll_sum.double()), "tokens": float(out.n_tokens)}, out.mems

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return _loss_metrics(totals["nll"], totals["tokens"])

    def describe(self, metrics: dict[str, float]) -> str:
        return f"ppl {metrics['ppl']:.2f}"


class CopyMemoryTask:
    """The copy-memory task (:class:`deq.data.CopyMemory`): recall ``n`` symbols after ``blank_len`` blanks.

    Training batch ``i`` is ``CopyMemory(seed=seed).batch(i)``; evaluation is
    ``eval_batches`` batches drawn with ``seed + 1000003``. No memory carries
    between batches. Metrics: the NLL over every position and the recall
    accuracy over the last ``n_symbols_to_copy`` positions (chance: 1/8).

    Args:
        vocab_size: must be :attr:`deq.data.CopyMemory.vocab_size` (10).
        blank_len, n_symbols_to_copy, repeat_delimiter: the task (see :class:`deq.data.CopyMemory`).
        batch_size, eval_batch_size: rows per batch over all ranks.
        eval_batches: batches per evaluation.
        seed: the training batches' seed.
        rank, world_size: this process's place in a DDP job (batches are sharded by rows).
        device: where batches live.

    Raises:
        ConfigError: a size below its minimum, another ``vocab_size``, rows not
            divisible over the ranks.
    """

    def __init__(self, *, vocab_size: int, blank_len: int, n_symbols_to_copy: int, repeat_delimiter: bool,
                 batch_size: int, eval_batch_size: int, eval_batches: int, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu"):
        info = DistInfo(rank=rank, world_size=world_size)
        if vocab_size != CopyMemory.vocab_size:
            raise ConfigError([f"data.vocab_size={vocab_size} but copy memory has {CopyMemory.vocab_size} tokens"])
        _check_size("data.batch_size", batch_size, world_size=world_size)
        _check_size("data.eval_batch_size", eval_batch_size, world_size=world_size)
        for key, value in (("eval_batches", eval_batches), ("blank_len", blank_len),
                           ("n_symbols_to_copy", n_symbols_to_copy)):
            _check_size(f"data.{key}", value)
        common = dict(blank_len=blank_len, n_symbols_to_copy=n_symbols_to_copy, repeat_delimiter=repeat_delimiter)
        # Batch i depends on (seed, i) only; the bound just has to exceed any step count.
        self.train = CopyMemory(batch_size=batch_size, n_batches=2**62, seed=seed, **common)
        self.valid = CopyMemory(batch_size=eval_batch_size, n_batches=eval_batches,
                                seed=seed + COPY_EVAL_SEED_OFFSET, **common)
        self.n_symbols = n_symbols_to_copy
        self.vocab_size = vocab_size
        self.info, self.device = info, device
        self.eval_splits = ("valid",)

    def _mine(self, x: Tensor, key: str) -> Tensor:
        return shard_rows(x, self.info, key).to(self.device)

    def train_batch(self, index: int) -> Batch:
        x, y = self.train.batch(index)
        return Batch(input=self._mine(x, "data.batch_size"), target=self._mine(y, "data.batch_size"), epoch=0,
                     new_sequence=True)

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.valid:
            yield self._mine(x, "data.eval_batch_size"), self._mine(y, "data.eval_batch_size")

    def score(self, model: nn.Module, input: Tensor, target: Tensor, *, mems: Any,
              mem_len: int | None) -> tuple[dict[str, float], Any]:
        logp = model(input).logits.float()
        k = self.n_symbols
        nll = -logp.gather(-1, target.unsqueeze(-1)).double().sum()
        hits = (logp.argmax(-1)[:, -k:] == target[:, -k:]).sum()
        return {"nll": float(nll), "tokens": float(target.numel()), "hits": float(hits),
                "recalled": float(target.shape[0] * k)}, None

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return {**_loss_metrics(totals["nll"], totals["tokens"]), "acc": totals["hits"] / totals["recalled"]}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"recall accuracy {metrics['acc']:.3f} (chance {1 / (self.vocab_size - 2):.3f})"
