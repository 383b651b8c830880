"""The composed config: checked as a whole before any work, and compared with a checkpoint's on resume.

:func:`validate` collects every problem it finds (type, range, and the
settings that contradict each other) and raises one :class:`ConfigError` that
names each key. Settings that depend on the data (a segment longer than a
split, a split too short for its batch) are checked when the task is built,
still before the first step.

:func:`resume_changes` lists, key by key, how the config differs from the one
stored in a checkpoint, leaving out the keys that may change between the
processes of one run (:data:`FREE_ON_RESUME`: where to read and write, how
often to log, how long to train).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf


REPO_ROOT = Path(__file__).resolve().parents[1]
RESUME = (False, True, "auto")
PRECISIONS = ("fp32", "bf16", "fp16")  # experiments.step maps them to autocast dtypes

# Keys that may differ between the processes of one run without changing what it computes.
FREE_ON_RESUME = ("resume", "allow_changes", "checkpoint", "out_dir", "device", "num_threads", "logger", "data.root",
                  "train.max_steps", "train.log_interval", "train.eval_interval", "train.ckpt_interval",
                  "train.eval_mem_len", "train.eval_max_batches", "train.test_at_end", "train.max_nonfinite",
                  "train.find_unused_parameters", "train.progress", "train.plots", "train.compare_explicit")


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists each with its key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``, with the constructor's own error instead of Hydra's wrapper.

    A :class:`ConfigError` or ``FileNotFoundError`` from the constructor is
    raised as it is; another ``ValueError`` / ``TypeError`` (a value or a key
    the constructor refuses) becomes a :class:`ConfigError` naming the target.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ConfigError, FileNotFoundError)):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError([f"{node.get('_target_')}: {cause}"]) from cause
        raise


def register_resolvers() -> None:
    """``${repo_path:REL}``: the absolute path ``<repo>/REL``, whatever the working directory."""
    if not OmegaConf.has_resolver("repo_path"):
        OmegaConf.register_new_resolver("repo_path", lambda rel: str((REPO_ROOT / str(rel)).resolve()))


class _Checks:
    """Reads keys of a config and records a problem for each value that is not what it must be."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.problems = cfg, []

    def get(self, key: str) -> Any:
        return OmegaConf.select(self.cfg, key, throw_on_missing=True)

    def integer(self, key: str, *, minimum: int, optional: bool = False) -> bool:
        value = self.get(key)
        if value is None and optional:
            return True
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{key} must be an integer{' or null' if optional else ''}, got {value!r}")
            return False
        if value < minimum:
            self.problems.append(f"{key} must be >= {minimum}, got {value}")
            return False
        return True

    def number(self, key: str, *, minimum: float, maximum: float = math.inf, optional: bool = False,
               strict: bool = False) -> bool:
        value = self.get(key)
        if value is None and optional:
            return True
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (numeric and (value > minimum if strict else value >= minimum) and value <= maximum):
            bound = f"{'>' if strict else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum < math.inf else "")
            self.problems.append(f"{key} must be a number {bound}{' or null' if optional else ''}, got {value!r}")
            return False
        return True

    def choice(self, key: str, options: tuple) -> bool:
        value = self.get(key)
        if not any(value is o or (type(value) is type(o) and value == o) for o in options):
            self.problems.append(f"{key} must be one of {', '.join(map(str, options))}; got {value!r}")
            return False
        return True

    def boolean(self, key: str) -> bool:
        return self.choice(key, (False, True))


def validate(cfg: DictConfig) -> None:
    """Check every setting the loop reads; raise one error listing all problems.

    Raises:
        ConfigError: the message has one line per problem, each naming its key.
    """
    c = _Checks(cfg)
    c.integer("seed", minimum=0)
    c.choice("resume", RESUME)
    c.integer("num_threads", minimum=1, optional=True)
    for key in ("allow_changes", "train.explicit", "train.compare_explicit", "train.test_at_end", "train.progress",
                "train.plots", "train.find_unused_parameters"):
        c.boolean(key)
    steps_ok = c.integer("train.max_steps", minimum=0)
    steps_ok = c.integer("train.pretrain_steps", minimum=0) and steps_ok
    c.integer("train.unroll_steps", minimum=1)
    for key in ("train.log_interval", "train.eval_interval", "train.ckpt_interval", "train.max_nonfinite"):
        c.integer(key, minimum=0)
    c.integer("train.eval_max_batches", minimum=1, optional=True)
    mem_ok = c.integer("train.eval_mem_len", minimum=0, optional=True)
    precision_ok = c.choice("train.precision", PRECISIONS)
    reduction_ok = c.integer("train.max_iter_reduction", minimum=0)
    c.number("train.jac_reg.weight", minimum=0.0)
    c.number("train.jac_reg.probability", minimum=0.0, maximum=1.0)
    c.number("train.jac_reg.increment", minimum=0.0)
    c.integer("train.jac_reg.increment_every", minimum=0)
    c.integer("train.jac_reg.probes", minimum=1)
    c.number("optim.clip", minimum=0.0, strict=True, optional=True)
    c.integer("data.vocab_size", minimum=1)
    for key in ("batch_size", "eval_batch_size", "tgt_len", "eval_tgt_len", "eval_batches"):
        if key in cfg.data:
            c.integer(f"data.{key}", minimum=1)
    if steps_ok:
        _check_pretraining(c)
    if reduction_ok:
        _check_budget(c)
    device_ok = _check_device(c)
    if precision_ok and device_ok:
        _check_precision(c)
    if mem_ok:
        _check_mem_len(c)
    _check_logger(c)
    _check_schedule(c)
    if c.problems:
        raise ConfigError(c.problems)


def _check_pretraining(c: _Checks) -> None:
    steps, pretrain = c.get("train.max_steps"), c.get("train.pretrain_steps")
    if not c.get("train.explicit") and steps > 0 and pretrain >= steps:
        c.problems.append(f"train.pretrain_steps={pretrain} must be below train.max_steps={steps}: every step "
                          f"would run unrolled and none as a DEQ (train.explicit=true trains the explicit twin "
                          f"for the whole run)")


def _check_budget(c: _Checks) -> None:
    reduction, budget = c.get("train.max_iter_reduction"), c.get("deq.max_iter")
    if reduction and isinstance(budget, int) and reduction >= budget:
        c.problems.append(f"train.max_iter_reduction={reduction} must be below deq.max_iter={budget} (the forward "
                          f"budget of a step is deq.max_iter minus a draw from 0..max_iter_reduction)")


def _check_device(c: _Checks) -> bool:
    device = str(c.get("device"))
    try:
        parsed = None if device == "auto" else torch.device(device)
    except RuntimeError:
        c.problems.append(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N")
        return False
    if parsed is not None and parsed.type == "cuda" and not torch.cuda.is_available():
        c.problems.append(f"device={device} but CUDA is not available; use device=cpu or device=auto")
        return False
    return True


def _check_precision(c: _Checks) -> None:
    if c.get("train.precision") != "fp16":
        return
    device = str(c.get("device"))
    cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if not cuda:
        c.problems.append(f"train.precision=fp16 needs a CUDA device (device={device}"
                          f"{', and CUDA is not available' if not torch.cuda.is_available() else ''}); "
                          f"use train.precision=bf16 or fp32")


def _check_mem_len(c: _Checks) -> None:
    mem_len = c.get("train.eval_mem_len")
    if mem_len is None:
        return
    try:
        model_cls = get_class(c.get("model._target_"))
    except Exception:  # instantiate reports a bad _target_ with its own message
        return
    if "mem_len" not in inspect.signature(model_cls.forward).parameters:
        c.problems.append(f"train.eval_mem_len={mem_len} but {model_cls.__name__} takes no mem_len (it has no "
                          f"memory of past positions to lengthen); set train.eval_mem_len=null")


def _check_schedule(c: _Checks) -> None:
    """The schedule checks its own values when built (it is cheap: a small dataclass)."""
    try:
        instantiate(c.cfg.schedule)
    except InstantiationException as err:
        c.problems.append(str(err.__cause__ or err))


def _check_logger(c: _Checks) -> None:
    logger = c.cfg.get("logger")
    if logger is None:
        return
    target = str(logger.get("_target_", ""))
    if target.endswith(".TensorBoard") and importlib.util.find_spec("tensorboard") is None:
        c.problems.append("logger=tensorboard needs the tensorboard package: pip install -e \".[tensorboard]\"")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _free(key: str) -> bool:
    return any(key == free or key.startswith(free + ".") for free in FREE_ON_RESUME)


def resume_changes(stored: dict, current: DictConfig) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, current value)`` for every setting that differs, the free ones left out.

    Args:
        stored: the resolved config saved in a checkpoint.
        current: this process's config.
    """
    old, new = _flatten(stored), _flatten(OmegaConf.to_container(current, resolve=True))
    missing = "<absent>"
    return [(key, old.get(key, missing), new.get(key, missing)) for key in sorted(old.keys() | new.keys())
            if not _free(key) and old.get(key, missing) != new.get(key, missing)]
