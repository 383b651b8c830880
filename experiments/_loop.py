"""The training loop behind experiments/train.py (no Hydra decorators here).

One run (:func:`fit`) trains one model:

* steps ``0 .. pretrain_steps - 1`` in unrolled mode (``model.deq.unroll_steps
  = L``: the explicit weight-tied network with ordinary autograd), then DEQ mode
  (``unroll_steps = None``); the explicit twin stays unrolled for the whole run;
* each step: forward (bf16 autocast on CUDA), a finiteness check of the loss
  (agreed across DDP ranks), backward, the global gradient norm (checked, then
  clipped), the optimizer step and the per-step learning-rate schedule. A
  non-finite loss or gradient norm, or a :class:`deq.NonFiniteError` from the
  solver, skips the step (no parameter change, the carried memory is reset)
  and is counted and logged; more than ``train.max_nonfinite`` in a row raise
  :class:`NonFiniteTrainingError`;
* every ``log_interval`` steps one JSON line (``kind: "train"``) in
  ``metrics.jsonl``; every ``eval_interval`` steps and at the end an evaluation
  of the validation split (``kind: "valid"``) with the layer in eval mode (its
  eval budget), the memory carried across segments in order, and the
  perplexity ``exp(total NLL / total tokens)`` over the whole split; the test
  split at the end;
* checkpoints (see :mod:`_checkpoint`) every ``ckpt_interval`` steps and at the
  end; ``resume=true`` continues from the last one bit-exactly (CPU).

Data are split over DDP ranks by rows of the global batch: rank ``r`` of ``W``
gets rows ``[r B/W, (r+1) B/W)`` of every batch, so ``W`` processes see exactly
the batch one process would, and DDP's gradient average over equal shards is
the gradient of the mean loss over the whole batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import deq
from deq.data import CopyMemory, Segments, batchify, load_corpus

import _checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
COPY_EVAL_SEED_OFFSET = 1_000_003  # evaluation batches never coincide with training batches
SCHEDULES = ("constant", "cosine", "plateau")


class NonFiniteTrainingError(RuntimeError):
    """Too many non-finite steps in a row: the run stops instead of training a NaN model."""


def register_resolvers() -> None:
    """``${repo_path:REL}``: the absolute path ``<repo>/REL``, whatever the working directory."""
    if not OmegaConf.has_resolver("repo_path"):
        OmegaConf.register_new_resolver("repo_path", lambda rel: str((REPO_ROOT / str(rel)).resolve()))


# --------------------------------------------------------------------------------------------
# processes and devices


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly single-process) job.

    Attributes:
        rank, world_size, local_rank: as torchrun sets them (0, 1, 0 alone).
        owned: this module initialised the process group (and destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """Join the torchrun job described by the environment, or run alone.

    An already initialised default process group (a test that spawned its
    workers itself) is used as is. Otherwise ``WORLD_SIZE > 1`` (set by
    torchrun) initialises one: NCCL when the run uses CUDA, gloo on CPUs.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), owned=True)


def teardown_distributed(info: DistInfo) -> None:
    if info.owned and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def autocast_for(device: torch.device, enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA when enabled; nothing on CPU (CPU bf16 is slower than fp32 here)."""
    if enabled and device.type == "cuda":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64; identity alone)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


# --------------------------------------------------------------------------------------------
# data


def _shard_rows(batch: Tensor, info: DistInfo, what: str) -> Tensor:
    """Rows ``[r B/W, (r+1) B/W)`` of a ``(B, ...)`` batch for rank ``r`` of ``W``."""
    if not info.enabled:
        return batch
    rows = batch.shape[0]
    if rows % info.world_size:
        raise ValueError(f"{what} ({rows}) must be divisible by the number of processes ({info.world_size})")
    per = rows // info.world_size
    return batch[info.rank * per:(info.rank + 1) * per]


class CopyMemoryData:
    """Copy-memory batches (:class:`deq.data.CopyMemory`), sharded by rows; no memory between batches.

    Training batch ``i`` is ``CopyMemory(seed=seed).batch(i)``; the position is
    ``{"epoch": 0, "segment": i}``.
    """

    task = "copy_memory"

    def __init__(self, cfg: DictConfig, *, seed: int, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        self.n_symbols = int(cfg.n_symbols_to_copy)
        common = dict(blank_len=int(cfg.blank_len), n_symbols_to_copy=self.n_symbols,
                      repeat_delimiter=bool(cfg.repeat_delimiter))
        # Batch i depends on (seed, i) only; the bound just has to exceed any step count.
        self.train = CopyMemory(batch_size=int(cfg.batch_size), n_batches=2**62, seed=seed, **common)
        self.valid = CopyMemory(batch_size=int(cfg.eval_batch_size), n_batches=int(cfg.eval_batches),
                                seed=seed + COPY_EVAL_SEED_OFFSET, **common)
        self.vocab_size = CopyMemory.vocab_size

    def next_train(self, pos: dict) -> tuple[dict, Tensor, Tensor, bool]:
        """The batch at ``pos``, the position after it, and whether to reset the memory (always)."""
        x, y = self.train.batch(pos["segment"])
        x = _shard_rows(x, self.info, "data.batch_size").to(self.device)
        y = _shard_rows(y, self.info, "data.batch_size").to(self.device)
        return {"epoch": pos["epoch"], "segment": pos["segment"] + 1}, x, y, True

    def has_split(self, split: str) -> bool:
        return split == "valid"

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.valid:
            yield (_shard_rows(x, self.info, "data.eval_batch_size").to(self.device),
                   _shard_rows(y, self.info, "data.eval_batch_size").to(self.device))


class LanguageModelData:
    """A word-level corpus batchified into rows and walked in order, segment by segment.

    The training position is ``{"epoch": e, "segment": i}`` (the next segment to
    train on); after the last segment of an epoch the next epoch starts at 0
    with a fresh memory.

    Raises:
        FileNotFoundError: from :func:`deq.data.load_corpus`, naming the
            directory, the missing files and the download command.
        ValueError: ``vocab_size`` in the config differs from the corpus.
    """

    task = "lm"

    def __init__(self, cfg: DictConfig, *, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device
        corpus = load_corpus(str(cfg.name), str(cfg.root))
        self.vocab_size = len(corpus.vocab)
        self.tgt_len, self.eval_tgt_len = int(cfg.tgt_len), int(cfg.eval_tgt_len)
        self.train_rows = _shard_rows(batchify(corpus.train, int(cfg.batch_size)), info,
                                      "data.batch_size").to(device)
        self.splits = {}
        for split in ("valid", "test"):
            ids = getattr(corpus, split)
            if ids is not None:
                self.splits[split] = _shard_rows(batchify(ids, int(cfg.eval_batch_size)), info,
                                                 "data.eval_batch_size").to(device)
        self.segments = Segments(self.train_rows, tgt_len=self.tgt_len)

    def next_train(self, pos: dict) -> tuple[dict, Tensor, Tensor, bool]:
        epoch, index = pos["epoch"], pos["segment"]
        reset = index == 0
        if index >= self.segments.n_segments:
            epoch, index, reset = epoch + 1, 0, True
        x, y = self.segments.segment(index)
        return {"epoch": epoch, "segment": index + 1}, x, y, reset

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def eval_segments(self, split: str) -> Segments:
        return Segments(self.splits[split], tgt_len=self.eval_tgt_len)


def build_data(cfg: DictConfig, *, info: DistInfo, device: torch.device) -> CopyMemoryData | LanguageModelData:
    """The data of ``cfg.data``; fills ``cfg.data.vocab_size`` when it is null."""
    task = cfg.data.task
    if task == "copy_memory":
        data = CopyMemoryData(cfg.data, seed=int(cfg.seed), info=info, device=device)
    elif task == "lm":
        data = LanguageModelData(cfg.data, info=info, device=device)
    else:
        raise ValueError(f"unknown data.task {task!r}; known: copy_memory, lm")
    if cfg.data.vocab_size is None:
        cfg.data.vocab_size = data.vocab_size
    elif int(cfg.data.vocab_size) != data.vocab_size:
        raise ValueError(f"data.vocab_size={cfg.data.vocab_size} but the {task} data have {data.vocab_size} "
                         f"tokens; set data.vocab_size={data.vocab_size} (or null to take it from the data)")
    return data


# --------------------------------------------------------------------------------------------
# model, optimizer, schedule


def build_model(cfg: DictConfig) -> nn.Module:
    """``instantiate(cfg.model)``, checking it holds its DEQ layer as ``.deq``."""
    model = instantiate(cfg.model)
    if not isinstance(getattr(model, "deq", None), deq.DEQLayer):
        raise TypeError(f"{type(model).__name__} must keep its deq.DEQLayer as .deq")
    return model


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device, *,
             find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` when running with several processes, else ``model``.

    The DEQ layer's backward needs nothing special: the solver runs under
    ``no_grad``, the re-attached call of ``f`` is an ordinary graph whose
    parameter gradients reach DDP's per-parameter hooks once, and Implicit's
    adjoint VJPs are taken with respect to ``z`` only (``autograd.grad``), which
    never touches the parameters' ``.grad`` (tests/test_ddp.py checks the
    gradients against one process on the whole batch).
    """
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


class Schedule:
    """The learning-rate schedule named by ``optim.scheduler.name``.

    * ``constant``: the optimizer's lr (after ``warmup_steps`` of linear warmup, if any);
    * ``cosine``: linear warmup ``lr (s + 1) / warmup_steps`` for steps
      ``s < warmup_steps``, then ``eta_min + (lr - eta_min) (1 + cos(pi p)) / 2``
      with ``p = (s - warmup_steps) / (max_steps - warmup_steps)`` (held at
      ``eta_min`` after ``max_steps``), as in the DEQ-Transformer recipe;
    * ``plateau``: :class:`torch.optim.lr_scheduler.ReduceLROnPlateau` on the
      validation loss after every evaluation (``factor``, ``patience``,
      ``min_lr``; any increase counts as no improvement).

    Per-step schedules are a ``LambdaLR`` over a closure: its state dict holds
    the step, never the function, so a resumed run recomputes the factors.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: DictConfig):
        self.name = str(cfg.name)
        self.lambda_lr = None
        self.plateau = None
        warmup = int(cfg.warmup_steps)
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown optim.scheduler.name {self.name!r}; known: {', '.join(SCHEDULES)}")
        if warmup < 0:
            raise ValueError(f"optim.scheduler.warmup_steps must be >= 0, got {warmup}")
        if self.name == "plateau":
            if warmup:
                raise ValueError("optim.scheduler.warmup_steps is not supported with the plateau schedule")
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=float(cfg.factor), patience=int(cfg.patience),
                min_lr=float(cfg.min_lr), threshold=0.0)
            return
        if self.name == "constant" and not warmup:
            return
        total = int(cfg.max_steps)
        eta_min = float(cfg.eta_min)
        cosine = self.name == "cosine"

        def factor_for(base_lr: float) -> Callable[[int], float]:
            floor = eta_min / base_lr if base_lr > 0 else 0.0

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                if not cosine:
                    return 1.0
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

            return factor

        self.lambda_lr = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [factor_for(g["lr"]) for g in optimizer.param_groups])

    def after_step(self) -> None:
        if self.lambda_lr is not None:
            self.lambda_lr.step()

    def after_eval(self, valid_loss: float) -> None:
        if self.plateau is not None and math.isfinite(valid_loss):
            self.plateau.step(valid_loss)

    def state_dict(self) -> dict:
        sched = self.lambda_lr or self.plateau
        return {"name": self.name, "state": None if sched is None else sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise ValueError(f"the checkpoint's schedule is {state['name']!r}, the config's {self.name!r}")
        sched = self.lambda_lr or self.plateau
        if sched is not None:
            sched.load_state_dict(state["state"])


# --------------------------------------------------------------------------------------------
# one step


@dataclasses.dataclass
class StepOutcome:
    """What one training step did.

    Attributes:
        ok: the parameters were updated (False: skipped as non-finite).
        loss: mean NLL over the whole (all-rank) batch; NaN when unavailable.
        n_tokens: target tokens over all ranks.
        grad_norm: global gradient norm before clipping (NaN when not computed).
        reason: why the step was skipped.
        mems: the memory to carry (``None`` after a skipped step).
        result: ``model.deq.last_result`` after the step (``None`` if skipped).
    """

    ok: bool
    loss: float
    n_tokens: int
    grad_norm: float
    reason: str | None
    mems: Any
    result: deq.SolverResult | None


def forward_backward(net: nn.Module, model: nn.Module, input: Tensor, target: Tensor, mems: Any, *,
                     info: DistInfo, device: torch.device,
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> StepOutcome:
    """Forward and backward of one batch, skipping (consistently on every rank) a non-finite loss.

    Gradients are accumulated into ``.grad`` (zero them first); ``ok`` tells
    whether they are usable. ``net`` is ``model`` or its DDP wrapper.
    """
    reason, out = None, None
    try:
        with autocast():
            out = net(input, target, mems=mems)
        nll, n = out.nll_sum.detach().double(), out.n_tokens
        if not torch.isfinite(nll):
            reason = "non-finite loss"
    except deq.NonFiniteError as err:
        nll, n, reason = torch.tensor(float("nan")), target.numel(), f"solver: {err}"
    # One collective for agreement and the logged loss: a rank that skipped must not leave the
    # others waiting in DDP's gradient all-reduce.
    bad, nll_sum, n_tokens = all_reduce_sum([float(reason is not None), float(nll if reason is None else 0.0),
                                             float(n)], info, device)
    if bad:
        return StepOutcome(False, float("nan"), int(n_tokens), float("nan"),
                           reason or "non-finite loss on another rank", None, None)
    try:
        out.loss.backward()
    except deq.NonFiniteError as err:
        if info.enabled:
            # The other ranks are inside DDP's all-reduce already; no consistent way to skip.
            raise
        return StepOutcome(False, nll_sum / n_tokens, int(n_tokens), float("nan"), f"backward solver: {err}",
                           None, None)
    return StepOutcome(True, nll_sum / n_tokens, int(n_tokens), float("nan"), None, out.mems, model.deq.last_result)


def _global_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all gradients together (float32 or wider), as a 0-d tensor."""
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].dtype) for n in norms]))


def train_step(net: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, input: Tensor, target: Tensor,
               mems: Any, *, clip: float | None, info: DistInfo, device: torch.device,
               autocast: Callable[[], contextlib.AbstractContextManager]) -> StepOutcome:
    """Zero the gradients, forward/backward, check and clip the gradient norm, step the optimizer."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    outcome = forward_backward(net, model, input, target, mems, info=info, device=device, autocast=autocast)
    if not outcome.ok:
        optimizer.zero_grad(set_to_none=True)
        return outcome
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # After DDP's all-reduce every rank holds the same gradients, hence the same norm and decision.
    norm = _global_norm(grads)
    outcome.grad_norm = float(norm)
    if not math.isfinite(outcome.grad_norm):
        optimizer.zero_grad(set_to_none=True)
        outcome.ok, outcome.reason, outcome.mems, outcome.result = False, "non-finite gradient", None, None
        return outcome
    if clip is not None and clip > 0:
        # clip_grad_norm_'s rule, on the norm already computed (one pass over the gradients, not two).
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    optimizer.step()
    return outcome


# --------------------------------------------------------------------------------------------
# evaluation


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    # Evaluation must not move the training RNG: a run that evaluates (or stops and resumes)
    # at step k then draws the same dropout masks as one that does not.
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


@torch.no_grad()
def evaluate(model: nn.Module, data: CopyMemoryData | LanguageModelData, split: str, *, info: DistInfo,
             device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
             eval_mem_len: int | None = None, max_batches: int | None = None) -> tuple[dict, deq.SolverResult | None]:
    """Loss and perplexity over a whole split (all ranks), with the layer's eval budget.

    Language models: the split's segments in order, memory carried, perplexity
    ``exp(sum NLL / sum tokens)``. Copy memory: NLL over every position and the
    recall accuracy (the last ``n_symbols_to_copy`` positions). ``max_batches``
    stops after that many segments (quick checks; the metrics then say
    ``partial``).

    Returns:
        ``(metrics, last_result)``: metrics with ``loss``, ``ppl``, ``n_tokens``,
        ``fwd_nstep`` / ``fwd_residual`` (means over segments) and
        ``fwd_residual_max``, plus ``acc`` for copy memory; ``last_result`` is
        ``model.deq.last_result`` of the last segment (for the convergence plot).
    """
    was_training = model.training
    old_mem_len = getattr(model, "mem_len", None)
    if eval_mem_len is not None:
        if old_mem_len is None:
            raise ValueError(f"train.eval_mem_len={eval_mem_len} but {type(model).__name__} has no mem_len")
        model.mem_len = int(eval_mem_len)
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens, hits, recall, n_seg, nstep, res, res_max = 0, 0.0, 0, 0, 0.0, 0.0, 0.0
    last, partial = None, False
    try:
        with _preserved_rng(device):
            if data.task == "lm":
                mems = None
                batches = ((x, y, True) for x, y in data.eval_segments(split))
            else:
                batches = ((x, y, False) for x, y in data.eval_batches(split))
            for x, y, carry in batches:
                if max_batches is not None and n_seg >= max_batches:
                    partial = True
                    break
                with autocast():
                    if carry:
                        out = model(x, y, mems=mems)
                        mems = out.mems
                        nll += out.nll_sum.double()
                    else:
                        out = model(x, None)
                        logp = out.logits.float()
                        nll -= logp.gather(-1, y.unsqueeze(-1)).double().sum()
                        k = data.n_symbols
                        hits += float((logp.argmax(-1)[:, -k:] == y[:, -k:]).sum())
                        recall += y.shape[0] * k
                tokens += y.numel()
                last = model.deq.last_result
                s = last.summary()
                n_seg += 1
                nstep += s["nstep_mean"]
                res += s["residual_mean"]
                res_max = max(res_max, s["residual_max"])
    finally:
        if eval_mem_len is not None:
            model.mem_len = old_mem_len
        model.train(was_training)
    total_nll, tokens, hits, recall, n_seg, nstep, res = all_reduce_sum(
        [float(nll), float(tokens), hits, float(recall), float(n_seg), nstep, res], info, device)
    if info.enabled:
        t = torch.tensor([res_max], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        res_max = float(t)
    if tokens < 1:
        raise ValueError(f"the {split} split has no target tokens (too short for its batch size?)")
    loss = total_nll / tokens
    metrics = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "n_tokens": int(tokens),
               "fwd_nstep": nstep / max(n_seg, 1), "fwd_residual": res / max(n_seg, 1),
               "fwd_residual_max": res_max}
    if recall:
        metrics["acc"] = hits / recall
    if partial:
        metrics["partial"] = True
    return metrics, last


# --------------------------------------------------------------------------------------------
# logging


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, written by rank 0 only, flushed per line."""

    def __init__(self, path: Path, run: str, *, enabled: bool):
        self.path, self.run, self.enabled = path, run, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"run": self.run, **record}, allow_nan=True) + "\n")

    def drop_after(self, step: int | None) -> None:
        """Forget this run's lines after ``step`` (all of them for ``None``): a resume replays them."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if rec.get("run") == self.run and (step is None or rec.get("step", 0) > step):
                continue
            keep.append(line)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)


def read_metrics(path: Path) -> list[dict]:
    """All parseable lines of a ``metrics.jsonl``."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _solver_stats(result: deq.SolverResult | None) -> dict:
    if result is None:
        return {}
    s = result.summary()
    stats = {"fwd_nstep": s["nstep_mean"], "fwd_residual": s["residual_mean"],
             "fwd_residual_max": s["residual_max"], "fwd_converged": s["converged_frac"]}
    if result.backward is not None:
        b = result.backward.summary()
        stats.update(bwd_nstep=b["nstep_mean"], bwd_residual=b["residual_mean"], bwd_converged=b["converged_frac"])
    return stats


# --------------------------------------------------------------------------------------------
# one run


def _progress(total: int, initial: int, *, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5, unit="step")


def _postfix(loss: float, result: deq.SolverResult | None, step_time: float) -> str:
    parts = [f"loss {loss:.3f}", f"ppl {math.exp(loss) if loss < 700 else math.inf:.1f}"]
    if result is not None:
        s = result.summary()
        mode = "unrolled" if result.solver == "unrolled" else "fwd"
        parts.append(f"{mode} {s['nstep_mean']:.1f}it r={s['residual_mean']:.1e}")
        if result.backward is not None:
            b = result.backward.summary()
            parts.append(f"bwd {b['nstep_mean']:.1f}it r={b['residual_mean']:.1e}")
    parts.append(f"{step_time * 1e3:.0f}ms/step")
    return " | ".join(parts)


def fit(cfg: DictConfig, *, run: str, explicit: bool, info: DistInfo, device: torch.device, out_dir: Path,
        checkpoint_path: Path, resume: bool) -> dict:
    """Train one model as ``cfg`` says; see the module docstring.

    Args:
        cfg: the composed config (``cfg.data.vocab_size`` may be filled in).
        run: the name in ``metrics.jsonl`` and on the progress bar (``"deq"``, ``"explicit"``).
        explicit: unrolled for the whole run (the explicit twin).
        info, device: from :func:`setup_distributed` / :func:`resolve_device`.
        out_dir: where ``metrics.jsonl`` goes.
        checkpoint_path: this run's checkpoint file.
        resume: continue from ``checkpoint_path`` when it exists.

    Returns:
        A dict: ``run``, ``steps``, ``history`` (``[step, loss]`` of the steps
        run by this call, ``loss`` NaN for skipped ones), ``train_loss`` (mean
        over the last log interval), ``valid`` and ``test`` metrics (``None``
        when not evaluated), ``nonfinite_steps``, ``time_s``, ``checkpoint``,
        ``last_train_result`` / ``last_eval_result`` (SolverResults, for plots).

    Raises:
        NonFiniteTrainingError: more than ``train.max_nonfinite`` non-finite steps in a row.
    """
    tcfg = cfg.train
    max_steps, pretrain, depth = int(tcfg.max_steps), int(tcfg.pretrain_steps), int(tcfg.unroll_steps)
    if max_steps < 0 or pretrain < 0 or depth < 1:
        raise ValueError(f"need train.max_steps >= 0, train.pretrain_steps >= 0, train.unroll_steps >= 1; got "
                         f"{max_steps}, {pretrain}, {depth}")
    started = time.perf_counter()
    seed = int(cfg.seed)
    seed_everything(seed)
    data = build_data(cfg, info=info, device=device)
    model = build_model(cfg).to(device)
    if info.rank:
        seed_everything(seed + info.rank)  # same initial weights everywhere, different dropout masks per rank
    net = wrap_ddp(model, info, device, find_unused_parameters=bool(tcfg.find_unused_parameters))
    optimizer = instantiate(cfg.optim.optimizer)(model.parameters())
    schedule = Schedule(optimizer, cfg.optim.scheduler)
    clip = None if cfg.optim.clip is None else float(cfg.optim.clip)
    autocast = autocast_for(device, bool(tcfg.amp))
    log = MetricsLog(out_dir / "metrics.jsonl", run, enabled=info.is_main)
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        layer = model.deq
        mode = (f"unrolled x{depth} throughout" if explicit else
                f"unrolled x{depth} for {pretrain} steps, then DEQ: {layer.solver} to {layer.stop_mode} "
                f"{layer.tol:g} in <= {layer.max_iter} (eval <= {layer.eval_max_iter}), backward {layer.backward}")
        print(f"[{run}] {type(model).__name__}, {n_params:,} parameters, {device}, {info.world_size} process(es); "
              f"{mode}; {max_steps} steps; output in {out_dir}")

    step, pos, mems = 0, {"epoch": 0, "segment": 0}, None
    counters = {"nonfinite_total": 0, "nonfinite_consecutive": 0}
    if resume and checkpoint_path.is_file():
        state = _checkpoint.load(checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        step, pos, counters = state["step"], dict(state["position"]), dict(state["counters"])
        if state["world_size"] == info.world_size:
            mine = state["ranks"][info.rank]
            mems = _checkpoint.to_device(mine["mems"], device)
            _checkpoint.set_rng_state(mine["rng"], device)
        elif info.is_main:
            print(f"warning: {checkpoint_path} was written by {state['world_size']} processes, this run has "
                  f"{info.world_size}: the memory and RNG streams restart (not a bit-exact resume)")
        log.drop_after(step)
        if info.is_main:
            print(f"[{run}] resumed from {checkpoint_path} at step {step}")
    else:
        log.drop_after(None)

    def unrolled_at(s: int) -> bool:
        return explicit or s < pretrain

    def save(at_step: int) -> None:
        per_rank = {"rng": _checkpoint.rng_state(device), "mems": _checkpoint.to_cpu(mems)}
        ranks = [per_rank]
        if info.enabled:
            ranks = [None] * info.world_size
            dist.all_gather_object(ranks, per_rank)
        if info.is_main:
            _checkpoint.save_atomic({
                "format": _checkpoint.FORMAT, "run": run, "step": at_step, "position": pos,
                "counters": counters, "world_size": info.world_size, "ranks": ranks,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": schedule.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True),
            }, checkpoint_path)
        if info.enabled:
            dist.barrier()

    def run_eval(split: str, at_step: int) -> tuple[dict, deq.SolverResult | None]:
        model.deq.unroll_steps = depth if unrolled_at(max(at_step - 1, 0)) else None
        t0 = time.perf_counter()
        metrics, last = evaluate(model, data, split, info=info, device=device, autocast=autocast,
                                 eval_mem_len=tcfg.eval_mem_len, max_batches=tcfg.eval_max_batches)
        record = {"kind": split, "step": at_step, "mode": "unrolled" if model.deq.unroll_steps else "deq",
                  **metrics, "eval_time_s": time.perf_counter() - t0}
        log.write(record)
        if info.is_main:
            acc = f" | recall acc {metrics['acc']:.3f}" if "acc" in metrics else ""
            bar.write(f"[{run}] step {at_step} {split}: loss {metrics['loss']:.4f} | ppl {metrics['ppl']:.2f}{acc} | "
                      f"{record['mode']} {metrics['fwd_nstep']:.1f}it residual {metrics['fwd_residual']:.1e}")
        return metrics, last

    history, valid, test = [], None, None
    last_train, last_eval = None, None
    interval = {"nll": 0.0, "tokens": 0, "steps": 0, "time": 0.0, "skipped": 0, "stats": []}
    log_every, eval_every, ckpt_every = int(tcfg.log_interval), int(tcfg.eval_interval), int(tcfg.ckpt_interval)
    bar = _progress(max_steps, step, desc=run, enabled=info.is_main and bool(tcfg.progress))
    try:
        while step < max_steps:
            pos, x, y, reset = data.next_train(pos)
            if reset:
                mems = None
            model.deq.unroll_steps = depth if unrolled_at(step) else None
            t0 = time.perf_counter()
            out = train_step(net, model, optimizer, x, y, mems, clip=clip, info=info, device=device,
                             autocast=autocast)
            schedule.after_step()
            dt = time.perf_counter() - t0
            step += 1
            mems = out.mems
            history.append([step, out.loss if out.ok else float("nan")])
            if out.ok:
                counters["nonfinite_consecutive"] = 0
                last_train = out.result
                interval["nll"] += out.loss * out.n_tokens
                interval["tokens"] += out.n_tokens
                interval["stats"].append(_solver_stats(out.result))
                bar.set_postfix_str(_postfix(out.loss, out.result, dt), refresh=False)
            else:
                counters["nonfinite_total"] += 1
                counters["nonfinite_consecutive"] += 1
                interval["skipped"] += 1
                log.write({"kind": "nonfinite", "step": step, "reason": out.reason,
                           "consecutive": counters["nonfinite_consecutive"], "total": counters["nonfinite_total"]})
                if info.is_main:
                    bar.write(f"[{run}] step {step}: skipped ({out.reason}); "
                              f"{counters['nonfinite_consecutive']} in a row, {counters['nonfinite_total']} in all")
                if counters["nonfinite_consecutive"] > int(tcfg.max_nonfinite):
                    raise NonFiniteTrainingError(
                        f"[{run}] {counters['nonfinite_consecutive']} non-finite steps in a row (more than "
                        f"train.max_nonfinite={tcfg.max_nonfinite}) at step {step}; last: {out.reason}. "
                        f"Stopping instead of training a NaN model: lower optim.optimizer.lr, tighten "
                        f"optim.clip, or raise the solver budget. The last good checkpoint is {checkpoint_path}.")
            interval["steps"] += 1
            interval["time"] += dt
            bar.update(1)

            if log_every > 0 and (step % log_every == 0 or step == max_steps) and interval["steps"]:
                loss = interval["nll"] / interval["tokens"] if interval["tokens"] else float("nan")
                stats = {}
                for key in sorted({k for s in interval["stats"] for k in s}):
                    vals = [s[key] for s in interval["stats"] if key in s]
                    stats[key] = max(vals) if key.endswith("_max") else sum(vals) / len(vals)
                log.write({"kind": "train", "step": step, "epoch": pos["epoch"], "lr": optimizer.param_groups[0]["lr"],
                           "mode": "unrolled" if model.deq.unroll_steps else "deq", "loss": loss,
                           "ppl": math.exp(loss) if loss < 700 else math.inf, "tokens": interval["tokens"],
                           "grad_norm": out.grad_norm, **stats, "skipped": interval["skipped"],
                           "step_time_s": interval["time"] / interval["steps"],
                           "elapsed_s": time.perf_counter() - started})
                interval = {"nll": 0.0, "tokens": 0, "steps": 0, "time": 0.0, "skipped": 0, "stats": [],
                            "last_loss": loss}
            if step == max_steps or (eval_every > 0 and step % eval_every == 0):
                if data.has_split("valid"):
                    valid, last_eval = run_eval("valid", step)
                    schedule.after_eval(valid["loss"])
            if step == max_steps or (ckpt_every > 0 and step % ckpt_every == 0):
                save(step)
        if step == max_steps and valid is None and data.has_split("valid"):
            valid, last_eval = run_eval("valid", step)  # a resumed run that had already finished
        if bool(tcfg.test_at_end) and data.has_split("test"):
            test, _ = run_eval("test", step)
    finally:
        bar.close()
    train_loss = interval.get("last_loss", float("nan"))
    return {"run": run, "steps": step, "history": history, "train_loss": train_loss, "valid": valid, "test": test,
            "nonfinite_steps": counters["nonfinite_total"], "time_s": time.perf_counter() - started,
            "checkpoint": str(checkpoint_path), "last_train_result": last_train, "last_eval_result": last_eval,
            "unroll_steps": depth}
