"""Generate text with a trained DEQ language model from a run of ``experiments/train.py``.

Usage (``python experiments/generate.py --help`` shows more)::

    python experiments/generate.py run_dir=outputs/DATE/TIME prompt="the company said" max_new_tokens=30
    python experiments/generate.py run_dir=... greedy=true          # argmax decoding
    python experiments/generate.py run_dir=... temperature=0.8 top_k=50 top_p=0.9 seed=3

The run's checkpoint holds its resolved config: the model is rebuilt from it,
the vocabulary is the run's corpus's (the same files, tokenised the same way),
and the prompt is split on whitespace like the corpus (an unknown word becomes
``<unk>``, with a warning).

**Incremental decoding** (the default, ``decode=incremental``): the prompt is
solved as one segment, then each new token alone:

* DEQ-Transformer: the new position's equilibrium is solved against the memory
  of every earlier position's equilibrium and injection (``mem_len`` as long as
  the context), so one solve of one position per token;
* DEQ-TrellisNet: the history state ``(h, c)`` of the last position is carried,
  with the last ``kernel_size - 1`` tokens as the injection's left context.

The log-probabilities equal the teacher-forced ones of the same text (one
segment, :func:`teacher_forced`) to the solver's tolerance: the earlier
positions' equilibria enter through the memory as they were solved, not as
the teacher-forced solve of the whole text finds them. With ``decode=window``
the model instead re-solves the whole context for every token (cost growing
with the context); in causal mode (the default of both models) the output at
a position depends on the tokens up to it only, exactly, so this equals
teacher forcing to rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from deq.data import Vocab, load_corpus
from deq.models import DEQTransformerLM, DEQTrellisNetLM
from experiments import checkpoint as ckpt
from experiments.config import ConfigError, build, register_resolvers

log = logging.getLogger("experiments.generate")
register_resolvers()
DECODES = ("incremental", "window")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the model's log-probabilities.

    Args:
        temperature: divides the logits (``> 0``; 1 leaves them as they are).
        top_k: keep the ``k`` most likely tokens (``None``: all).
        top_p: keep the smallest set of most likely tokens whose probability
            reaches ``p`` (nucleus sampling; ``None``: all).
        greedy: take the most likely token (the other options are then unused).

    Raises:
        ConfigError: a value out of range, naming its key.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 1):
            problems.append(f"top_k must be null or an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be null or in (0, 1], got {self.top_p!r}")
        if problems:
            raise ConfigError(problems)

    def pick(self, logp: Tensor, generator: torch.Generator) -> int:
        """One token id from ``(V,)`` log-probabilities."""
        if self.greedy:
            return int(logp.argmax())
        logits = logp.double() / self.temperature
        if self.top_k is not None and self.top_k < logits.numel():
            kth = logits.topk(self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1:
            probs, order = logits.softmax(dim=0).sort(descending=True)
            # Keep each token whose preceding mass is below p (the most likely one always).
            drop = (probs.cumsum(dim=0) - probs) >= self.top_p
            logits = logits.index_put((order[drop],), torch.tensor(-math.inf, dtype=logits.dtype))
        return int(torch.multinomial(logits.softmax(dim=0), 1, generator=generator))


def load_run(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Vocab, DictConfig]:
    """The model (eval mode, trained weights), the vocabulary and the config of a training run.

    Args:
        path: the run's directory (its ``checkpoint.pt``) or a checkpoint file.
        device: where the model goes.

    Raises:
        CheckpointError: no usable checkpoint (the message names the file).
        ConfigError: the run is not a language model (the copy-memory task has no text).
    """
    path = Path(path)
    state, used = ckpt.load_latest(path / "checkpoint.pt" if path.is_dir() else path)
    cfg = OmegaConf.create(state["config"])
    if "name" not in cfg.data:
        raise ConfigError([f"{used} was trained on {cfg.data.get('_target_')}, not on a corpus: nothing to "
                           "generate text from"])
    vocab = load_corpus(str(cfg.data.name), str(cfg.data.root), splits=("train",)).vocab
    model = build(cfg.model)
    model.load_state_dict(state["model"])
    model.set_unroll_steps(None if int(state["state"]["step"]) >= int(cfg.train.pretrain_steps)
                           else int(cfg.train.unroll_steps))
    log.info("loaded %s (step %s, %s, %d words)", used, state["state"]["step"], type(model).__name__, len(vocab))
    return model.to(device).eval(), vocab, cfg


def encode(text: str, vocab: Vocab) -> Tensor:
    """The prompt's token ids, split on whitespace as the corpus was; unknown words become ``<unk>``.

    Raises:
        ConfigError: an empty prompt, or an unknown word and no ``<unk>`` in the vocabulary.
    """
    words = text.split()
    if not words:
        raise ConfigError(["prompt is empty: give at least one word (prompt=\"the company\")"])
    unknown = [w for w in words if w not in vocab]
    if unknown and vocab.unk_id is None:
        raise ConfigError([f"prompt words not in the vocabulary (which has no <unk>): {', '.join(unknown)}"])
    if unknown:
        log.warning("not in the vocabulary, read as <unk>: %s", ", ".join(sorted(set(unknown))))
    return torch.tensor([vocab.unk_id if w not in vocab else vocab.token_to_id(w) for w in words])


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, ids: Tensor) -> Tensor:
    """``(L, V)`` next-token log-probabilities of the text ``ids`` run as one segment."""
    kwargs = {"mem_len": 0} if isinstance(model, DEQTransformerLM) else {}
    return model(ids[None], **kwargs).logits[0]


class Decoder:
    """Feeds a model one sequence token by token; :meth:`feed` returns the next token's log-probabilities.

    Args:
        model: a :class:`DEQTransformerLM` or :class:`DEQTrellisNetLM` in eval mode.
        decode: ``"incremental"`` (one new position per solve, with memory or
            history carried) or ``"window"`` (the whole context re-solved).
    """

    def __init__(self, model: torch.nn.Module, *, decode: str = "incremental"):
        if decode not in DECODES:
            raise ConfigError([f"decode must be one of {', '.join(DECODES)}, got {decode!r}"])
        if not isinstance(model, (DEQTransformerLM, DEQTrellisNetLM)):
            raise TypeError(f"no decoder for {type(model).__name__}")
        self.model, self.decode = model, decode
        self.context: Tensor | None = None
        self.mems: Any = None

    @torch.no_grad()
    def feed(self, ids: Tensor) -> Tensor:
        """Append ``ids`` (1-D) to the context; the ``(V,)`` log-probabilities of the token after them."""
        before = self.context
        self.context = ids if before is None else torch.cat([before, ids])
        if self.decode == "window":
            return teacher_forced(self.model, self.context)[-1]
        if isinstance(self.model, DEQTransformerLM):
            # Keep every position in the memory: the new tokens attend to the whole context.
            out = self.model(ids[None], mems=self.mems, mem_len=self.context.numel())
        else:
            # The carried (h, c) and the tokens before these as the injection's left context.
            prefix = None if before is None else before[-(self.model.kernel_size - 1):][None]
            out = self.model(ids[None], mems=self.mems, prefix=prefix)
        self.mems = out.mems
        return out.logits[0, -1]


@dataclasses.dataclass
class Generated:
    """What :func:`generate` produced: the new token ids, their log-probabilities, the time it took."""

    ids: list[int]
    logprobs: list[float]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else math.inf


def generate(model: torch.nn.Module, prompt: Tensor, *, max_new_tokens: int, sampling: Sampling,
             generator: torch.Generator, decode: str = "incremental") -> Generated:
    """Sample ``max_new_tokens`` tokens after ``prompt`` (1-D token ids)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError([f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}"])
    decoder = Decoder(model, decode=decode)
    start = time.perf_counter()
    logp = decoder.feed(prompt)
    ids, chosen = [], []
    for _ in range(max_new_tokens):
        token = sampling.pick(logp, generator)
        ids.append(token)
        chosen.append(float(logp[token]))
        logp = decoder.feed(torch.tensor([token]))
    return Generated(ids=ids, logprobs=chosen, seconds=time.perf_counter() - start)


def run(cfg: DictConfig) -> dict:
    """Load the run, encode the prompt, generate, check against teacher forcing; returns what it printed."""
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.run_dir is None:
        raise ConfigError(["run_dir is required: the directory of a training run (or checkpoint=PATH)"])
    model, vocab, train_cfg = load_run(cfg.checkpoint or cfg.run_dir)
    if cfg.causal is not None:
        model.deq.time_dim = ((1 if isinstance(model, DEQTransformerLM) else 2) if cfg.causal else None)
    sampling = Sampling(temperature=float(cfg.temperature), top_k=cfg.top_k, top_p=cfg.top_p, greedy=bool(cfg.greedy))
    prompt = encode(str(cfg.prompt), vocab)
    out = generate(model, prompt, max_new_tokens=int(cfg.max_new_tokens), sampling=sampling,
                   generator=torch.Generator().manual_seed(int(cfg.seed)), decode=str(cfg.decode))
    text = " ".join(vocab.decode(out.ids))
    result = {"prompt": str(cfg.prompt), "text": text, "ids": out.ids, "tokens_per_second": out.tokens_per_second,
              "causal": model.deq.time_dim is not None, "decode": str(cfg.decode)}
    print(f"{cfg.prompt} [{text}]")
    print(f"{len(out.ids)} tokens in {out.seconds:.2f} s: {out.tokens_per_second:.1f} tokens/s "
          f"({cfg.decode} decoding, {'causal' if result['causal'] else 'non-causal'} solves)")
    if cfg.check and out.ids:
        full = teacher_forced(model, torch.cat([prompt, torch.tensor(out.ids)]))
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(out.ids))
        forced = full[positions, torch.tensor(out.ids)]
        result["max_abs_diff"] = float((forced - torch.tensor(out.logprobs)).abs().max())
        print(f"teacher-forced log-probabilities of the same text differ by at most {result['max_abs_diff']:.3g}")
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, ckpt.CheckpointError, FileNotFoundError) as err:
        log.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
