"""Train a DEQ language model (or the copy-memory task) from the Hydra configs in ../configs.

Usage::

    python experiments/train.py                                  # embedded default: copy memory, CPU, minutes
    python experiments/train.py experiment=ptb_sample_transformer
    python experiments/train.py experiment=wt103_transformer     # the paper recipe (CUDA GPUs)
    python experiments/train.py -m grad=implicit,upg,npg         # a sweep: one job and directory each
    torchrun --nproc_per_node=8 experiments/train.py experiment=wt103_transformer   # DDP
    python experiments/train.py ... resume=true hydra.run.dir=outputs/2025-01-01/12-00-00

Everything lands in Hydra's run directory: ``metrics.jsonl`` (one JSON line per
log interval, evaluation and skipped step), ``checkpoint.pt``, the resolved
config (``.hydra/``) and, at the end, ``convergence.png`` and
``learning_curve.png``. The loop itself is in ``_loop.py``; :func:`train` is
importable and returns the results (tests drive it through ``hydra.compose``).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

# The helper modules (_loop, _checkpoint, plots) sit next to this file; a script's own
# directory is on sys.path already, an importer's (tests, python -m) may not be.
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import hydra  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import _loop  # noqa: E402
import plots  # noqa: E402

_loop.register_resolvers()


def _output_dir(cfg: DictConfig, info: _loop.DistInfo) -> Path:
    """``cfg.out_dir``, else Hydra's run directory, else ``outputs/<date>/<time>``; rank 0's on every rank."""
    if cfg.out_dir is not None:
        out = Path(str(cfg.out_dir))
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            out = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # composed without @hydra.main (tests, notebooks)
            out = Path("outputs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    if info.enabled:
        # Each torchrun process composed its own config; their timestamped directories may differ.
        shared = [str(out)]
        dist.broadcast_object_list(shared, src=0)
        out = Path(shared[0])
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def _print_summary(cfg: DictConfig, results: dict) -> None:
    deq_run = results.get("deq")
    twin = results.get("explicit")
    if cfg.data.task == "copy_memory":
        n, t = cfg.data.n_symbols_to_copy, cfg.data.blank_len
        print(f"\ncopy memory: recall {n} symbols after {t} steps (sequence length {t + 2 * n}); chance 1/8 = 0.125")
        print(f"{'model':<28} {'recall acc':>10} {'valid loss':>11} {'time':>9}  solver")
        for name, res in (("DEQ", deq_run), ("explicit twin", twin)):
            if res is None or res["valid"] is None:
                continue
            v = res["valid"]
            if name == "DEQ":
                label = f"DEQ ({cfg.train.pretrain_steps} unrolled + {res['steps'] - cfg.train.pretrain_steps} DEQ)"
                solver = f"{v['fwd_nstep']:.1f} fwd iterations, residual {v['fwd_residual']:.1e} (eval)"
            else:
                label = f"explicit twin ({res['unroll_steps']} layers)"
                solver = "-"
            print(f"{label:<28} {v['acc']:>10.3f} {v['loss']:>11.4f} {res['time_s']:>8.1f}s  {solver}")
        return
    for name, res in (("DEQ", deq_run), ("explicit twin", twin)):
        if res is None:
            continue
        line = f"{name}: {res['steps']} steps in {res['time_s']:.1f}s"
        if math.isfinite(res["train_loss"]):
            line += f" | train ppl {math.exp(res['train_loss']):.2f} (last log interval)"
        if res["valid"] is not None:
            line += f" | valid ppl {res['valid']['ppl']:.2f} ({res['valid']['fwd_nstep']:.1f} fwd iterations)"
        if res["test"] is not None:
            line += f" | test ppl {res['test']['ppl']:.2f}"
        print(line)


def _plots(cfg: DictConfig, results: dict, out_dir: Path) -> None:
    traces = {}
    for name, res in results.items():
        last = res["last_train_result"]
        if last is not None and last.solver != "unrolled":
            traces[f"{name} train forward"] = last.trace
            if last.backward is not None:
                traces[f"{name} train backward"] = last.backward.trace
        last = res["last_eval_result"]
        if last is not None:
            label = "unrolled" if last.solver == "unrolled" else "forward"
            traces[f"{name} eval {label}"] = last.trace
    written = [plots.plot_convergence(traces, out_dir / "convergence.png", tol=float(cfg.deq.tol)),
               plots.plot_learning_curves(_loop.read_metrics(out_dir / "metrics.jsonl"),
                                          out_dir / "learning_curve.png")]
    for path in written:
        if path is not None:
            print(f"wrote {path}")


def train(cfg: DictConfig) -> dict:
    """Train as ``cfg`` says (see ../configs/train.yaml) and return the results.

    Args:
        cfg: a config composed from ``configs/train.yaml`` (by ``@hydra.main`` or
            ``hydra.compose``). ``cfg.data.vocab_size`` is filled in when null.

    Returns:
        The main run's results (see ``_loop.fit``: ``steps``, ``history``,
        ``train_loss``, ``valid``, ``test``, ``nonfinite_steps``, ``time_s``,
        ``checkpoint``, ...) plus ``out_dir`` and ``explicit``: the explicit
        twin's results when ``train.compare_explicit`` (else ``None``).

    Raises:
        FileNotFoundError: a corpus is missing (the message names the directory
            and the download command).
        _loop.NonFiniteTrainingError: too many non-finite steps in a row.
    """
    info = _loop.setup_distributed(str(cfg.device))
    try:
        if cfg.num_threads is not None:
            torch.set_num_threads(int(cfg.num_threads))
        device = _loop.resolve_device(str(cfg.device), info)
        out_dir = _output_dir(cfg, info)
        checkpoint = Path(str(cfg.checkpoint)) if cfg.checkpoint is not None else out_dir / "checkpoint.pt"
        explicit = bool(cfg.train.explicit)
        main_run = "explicit" if explicit else "deq"
        common = dict(info=info, device=device, out_dir=out_dir, resume=bool(cfg.resume))
        results = {main_run: _loop.fit(cfg, run=main_run, explicit=explicit, checkpoint_path=checkpoint, **common)}
        if bool(cfg.train.compare_explicit) and not explicit:
            twin_checkpoint = checkpoint.with_name(f"{checkpoint.stem}-explicit{checkpoint.suffix}")
            results["explicit"] = _loop.fit(cfg, run="explicit", explicit=True, checkpoint_path=twin_checkpoint,
                                            **common)
        if info.is_main:
            _print_summary(cfg, results)
            if bool(cfg.train.plots):
                _plots(cfg, results, out_dir)
        out = dict(results[main_run])
        out["out_dir"] = str(out_dir)
        out["explicit"] = results.get("explicit") if not explicit else None
        return out
    finally:
        _loop.teardown_distributed(info)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final validation loss (for sweepers)."""
    result = train(cfg)
    valid = result["valid"]
    return None if valid is None else float(valid["loss"])


if __name__ == "__main__":
    main()
