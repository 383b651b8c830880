"""Train a DEQ language model (or the copy-memory task) from the Hydra configs in ../configs.

Usage (``python experiments/train.py --help`` shows more)::

    python experiments/train.py                                  # embedded default: copy memory, CPU, minutes
    python experiments/train.py experiment=ptb_sample_transformer
    python experiments/train.py experiment=wt103_transformer     # the paper recipe (CUDA GPUs)
    python experiments/train.py -m grad=implicit,upg,npg         # a sweep: one job and directory each
    torchrun --nproc_per_node=8 experiments/train.py experiment=wt103_transformer   # DDP
    python experiments/train.py ... resume=true hydra.run.dir=outputs/2025-01-01/12-00-00

Everything lands in Hydra's run directory: ``metrics.jsonl``, ``checkpoint.pt``
(and ``checkpoint.prev.pt``), ``train.log``, the resolved config
(``.hydra/``) and, at the end, ``learning_curve.png`` and ``convergence.png``.
:func:`train` is importable (``from experiments.train import train``); tests
drive it through ``hydra.compose``.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from experiments import distributed, plots
from experiments.checkpoint import CheckpointError
from experiments.config import ConfigError, register_resolvers, validate
from experiments.logs import read_metrics
from experiments.loop import NonFiniteTrainingError, ResumeError, RunSummary, TrainingInterrupted, fit

log = logging.getLogger("experiments.train")
register_resolvers()


def _output_dir(cfg: DictConfig, info: distributed.DistInfo) -> Path:
    """``cfg.out_dir``, else Hydra's run directory, else ``outputs/<date>/<time>``; rank 0's on every rank."""
    if cfg.out_dir is not None:
        out = Path(str(cfg.out_dir))
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            out = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # composed without @hydra.main (tests, notebooks)
            out = Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    # Each torchrun process composed its own config; their timestamped directories may differ.
    out = Path(distributed.broadcast(str(out), info))
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: DictConfig) -> dict[str, RunSummary]:
    """Train as ``cfg`` says (see ../configs/train.yaml) and return each run's summary.

    Args:
        cfg: a config composed from ``configs/train.yaml`` (by ``@hydra.main`` or ``hydra.compose``).

    Returns:
        ``{"deq": ..., "explicit": ...}``: the main run first (``"explicit"``
        alone with ``train.explicit=true``), then the explicit twin when
        ``train.compare_explicit``.

    Raises:
        experiments.config.ConfigError: invalid settings (all of them listed, each with its key).
        FileNotFoundError: a corpus is missing (the message gives the download command).
        experiments.loop.ResumeError: ``resume`` refused (no checkpoint, an existing one, changed settings).
        experiments.checkpoint.CheckpointError: no usable checkpoint (the message names the file).
        experiments.loop.NonFiniteTrainingError: too many non-finite steps in a row.
        experiments.loop.TrainingInterrupted: SIGINT / SIGTERM, after a checkpoint.
    """
    validate(cfg)
    info = distributed.setup(str(cfg.device))
    if not info.is_main:  # one copy of the log lines (rank 0's); warnings from every rank
        logging.getLogger("experiments").setLevel(logging.WARNING)
    try:
        if cfg.num_threads is not None:
            torch.set_num_threads(int(cfg.num_threads))
        device = distributed.resolve_device(str(cfg.device), info)
        out_dir = _output_dir(cfg, info)
        checkpoint = Path(str(cfg.checkpoint)) if cfg.checkpoint is not None else out_dir / "checkpoint.pt"
        runs = [("explicit" if cfg.train.explicit else "deq", bool(cfg.train.explicit), checkpoint, cfg.resume)]
        if cfg.train.compare_explicit and not cfg.train.explicit:
            # resume=true continues the job: a twin that had not started yet starts now.
            runs.append(("explicit", True, checkpoint.with_name(f"{checkpoint.stem}-explicit{checkpoint.suffix}"),
                         "auto" if cfg.resume is True else cfg.resume))
        results = {name: fit(cfg, name=name, explicit=explicit, info=info, device=device, out_dir=out_dir,
                             checkpoint=path, resume=resume) for name, explicit, path, resume in runs}
        if info.is_main:
            _report(results)
            if cfg.train.plots and not all(r.already_finished for r in results.values()):
                _plots(cfg, results, out_dir)
        return results
    finally:
        distributed.teardown(info)


def _report(results: dict[str, RunSummary]) -> None:
    for res in results.values():
        parts = [f"{res.run}: {res.steps} steps in {res.time_s:.1f}s"]
        if math.isfinite(res.train_loss):
            parts.append(f"train loss {res.train_loss:.4f} (last log interval)")
        if res.valid is not None:
            parts.append(f"valid {res.valid_text} ({res.valid['fwd_nstep']:.1f} forward iterations)")
        if res.test is not None:
            parts.append(f"test {res.test_text}")
        if res.nonfinite_steps:
            parts.append(f"{res.nonfinite_steps} non-finite steps skipped")
        log.info(" | ".join(parts))


def _plots(cfg: DictConfig, results: dict[str, RunSummary], out_dir: Path) -> None:
    switches = {name: r.switch_step for name, r in results.items() if r.switch_step is not None}
    curves = plots.plot_learning_curves(read_metrics(out_dir / "metrics.jsonl"), out_dir / "learning_curve.png",
                                        switch_steps=switches)
    solves = {f"{name} {label}": traces for name, r in results.items() for label, traces in r.traces.items()}
    convergence = plots.plot_convergence(solves, out_dir / "convergence.png", tol=float(cfg.deq.tol))
    for path in (curves, convergence):
        if path is not None:
            log.info("wrote %s", path)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final validation loss (for sweepers).

    A fault the user can act on (a setting, a resume, a checkpoint, the data,
    a diverged run) ends with its message and exit status 1, without a
    traceback; SIGINT / SIGTERM with 128 + the signal number.
    """
    try:
        results = train(cfg)
    except (ConfigError, ResumeError, CheckpointError, NonFiniteTrainingError, FileNotFoundError) as err:
        log.error("%s", err)
        sys.exit(1)
    except TrainingInterrupted as stop:
        log.warning("%s", stop)
        sys.exit(128 + stop.signum)
    except KeyboardInterrupt:
        log.warning("interrupted: the newest checkpoint is intact; continue with resume=true")
        sys.exit(128 + signal.SIGINT)
    valid = next(iter(results.values())).valid
    return None if valid is None else float(valid["loss"])


if __name__ == "__main__":
    main()
