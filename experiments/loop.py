"""The training loop: one run of one model, read top to bottom in :func:`fit`.

A run trains steps ``0 .. pretrain_steps - 1`` unrolled (the explicit
weight-tied network, ``model.set_unroll_steps(unroll_steps)``) and the rest as
a DEQ (``model.set_unroll_steps(None)``); the explicit twin stays unrolled.
Each step:

1. plans itself (:func:`plan_step`): the mode, the forward budget
   (``deq.max_iter`` minus a uniform draw from ``0..train.max_iter_reduction``)
   and, with probability ``train.jac_reg.probability``, the Jacobian
   regulariser at its current weight, all from one generator in the state;
2. takes the next batch of the task (a fresh memory at a new sequence);
3. sets the learning rate of the schedule for this step;
4. steps (:class:`experiments.step.Stepper`): skipped, counted and logged when
   non-finite; more than ``train.max_nonfinite`` in a row stop the run.

Every ``log_interval`` steps one ``train`` line, every ``eval_interval`` a
validation, every ``ckpt_interval`` a checkpoint (never during a non-finite
streak: the newest checkpoint is then one from before it); at the end the
last line, validation and test, and a final checkpoint that holds the
results, so resuming a finished run only reports them. ``resume=true``
continues bit-exactly from the checkpoint (the log interval in progress
included). SIGINT or SIGTERM stops after the current step with a checkpoint;
a second one stops at once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import checkpoint as ckpt
from .config import build, resume_changes
from .distributed import DistInfo, all_reduce, barrier, gather, wrap
from .evaluation import evaluate
from .logs import MetricsLog, Progress, eval_line, solver_stats, train_line
from .state import TrainState, Window, rank_state, restore_rng, seed_everything, to_device
from .step import StepOutcome, StepPlan, Stepper, grad_scaler
from .tasks import Batch, Task

log = logging.getLogger(__name__)
TRACES_KEPT = 20  # training steps whose solver traces are kept for the convergence plot


class NonFiniteTrainingError(RuntimeError):
    """Too many non-finite steps in a row: the run stops instead of training a NaN model."""


class ResumeError(RuntimeError):
    """``resume`` cannot do what it was asked: no checkpoint, an existing one, or changed settings."""


class TrainingInterrupted(RuntimeError):
    """SIGINT / SIGTERM stopped the run after a step, with a checkpoint.

    Attributes:
        signum: the signal.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclasses.dataclass
class RunSummary:
    """What :func:`fit` returns.

    Attributes:
        run: ``"deq"`` or ``"explicit"``.
        steps: steps taken in all (over every process of the run).
        time_s: time spent training and evaluating, over every process.
        train_loss: mean training NLL of the last log interval.
        valid, test: final metrics (``None`` for a split the task lacks).
        valid_text, test_text: the task's one-line summaries of them.
        nonfinite_steps: skipped non-finite steps in all.
        checkpoint: the checkpoint file.
        already_finished: the run had finished before this call (nothing was run).
        switch_step: the step at which unrolled training switched to the DEQ, if it did.
        traces: residual traces for the convergence plot: ``"valid forward"`` of
            every batch of the final validation, ``"train forward"`` / ``"train
            backward"`` of the last DEQ training steps (empty when unrolled).
    """

    run: str
    steps: int
    time_s: float
    train_loss: float
    valid: dict | None
    test: dict | None
    valid_text: str | None
    test_text: str | None
    nonfinite_steps: int
    checkpoint: str
    already_finished: bool
    switch_step: int | None
    traces: dict[str, list[torch.Tensor]]


@dataclasses.dataclass
class Run:
    """The objects of one run, built from the config by :func:`build_run`."""

    name: str
    cfg: DictConfig
    explicit: bool
    info: DistInfo
    device: torch.device
    checkpoint: Path
    task: Task
    model: nn.Module
    stepper: Stepper
    schedule: Any
    base_lrs: list[float]
    metrics: MetricsLog
    sinks: list
    started: float = dataclasses.field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0
    traces: dict[str, collections.deque] = dataclasses.field(default_factory=dict)

    @property
    def train(self) -> DictConfig:
        return self.cfg.train

    @property
    def max_steps(self) -> int:
        return int(self.train.max_steps)

    def unrolled_at(self, step: int) -> bool:
        return self.explicit or step < int(self.train.pretrain_steps)

    def write(self, record: dict) -> None:
        if self.info.is_main:
            for sink in self.sinks:
                sink.write(record)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def build_run(cfg: DictConfig, *, name: str, explicit: bool, info: DistInfo, device: torch.device,
              out_dir: Path, checkpoint: Path) -> Run:
    """The task, model, optimizer, schedule and logs of one run, freshly initialised from ``cfg``."""
    seed = int(cfg.seed)
    seed_everything(seed)
    task = build(cfg.data, rank=info.rank, world_size=info.world_size, device=device)
    model = build(cfg.model).to(device)
    if not callable(getattr(model, "set_unroll_steps", None)) or not hasattr(getattr(model, "deq", None),
                                                                             "last_result"):
        raise TypeError(f"{type(model).__name__} must have set_unroll_steps() and keep its DEQ layer as .deq")
    if info.rank:
        seed_everything(seed + info.rank)  # same initial weights everywhere, different dropout masks per rank
    net = wrap(model, info, device, find_unused_parameters=bool(cfg.train.find_unused_parameters))
    optimizer = build(cfg.optim.optimizer)(model.parameters())
    precision = str(cfg.train.precision)
    stepper = Stepper(net=net, model=model, optimizer=optimizer,
                      clip=None if cfg.optim.clip is None else float(cfg.optim.clip), precision=precision,
                      scaler=grad_scaler(precision, device), info=info, device=device)
    metrics = MetricsLog(out_dir / "metrics.jsonl", name)
    return Run(name=name, cfg=cfg, explicit=explicit, info=info, device=device, checkpoint=checkpoint, task=task,
               model=model, stepper=stepper, schedule=build(cfg.schedule),
               base_lrs=[float(g["lr"]) for g in optimizer.param_groups], metrics=metrics, sinks=[metrics])


def fit(cfg: DictConfig, *, name: str, explicit: bool, info: DistInfo, device: torch.device, out_dir: Path,
        checkpoint: Path, resume: bool | str) -> RunSummary:
    """Train one model as ``cfg`` says (see the module docstring) and return its summary.

    Args:
        cfg: a validated config (:func:`experiments.config.validate`).
        name: the run's name in ``metrics.jsonl`` and the logs (``"deq"``, ``"explicit"``).
        explicit: unrolled for the whole run (the explicit twin).
        info, device: the job and this process's device.
        out_dir: where ``metrics.jsonl`` (and TensorBoard's files) go.
        checkpoint: this run's checkpoint file.
        resume: ``False``, ``True`` or ``"auto"`` (see :func:`check_resume`).

    Raises:
        ResumeError: ``resume`` was refused (see :func:`check_resume`, :func:`start_state`).
        NonFiniteTrainingError: more than ``train.max_nonfinite`` non-finite steps in a row.
        TrainingInterrupted: SIGINT / SIGTERM, after a checkpoint.
    """
    resuming = check_resume(name, checkpoint, resume)
    run = build_run(cfg, name=name, explicit=explicit, info=info, device=device, out_dir=out_dir,
                    checkpoint=checkpoint)
    state = start_state(run, out_dir, resuming=resuming)
    try:
        if state.final is not None and state.step >= run.max_steps:
            log.info("[%s] finished at step %d (%s): nothing to do", name, state.step, run.checkpoint)
            return summarise(run, state, already_finished=True)
        state.final = None
        progress = Progress(total=run.max_steps, initial=state.step, desc=name,
                            enabled=info.is_main and bool(run.train.progress))
        with _StopSignal() as stop, progress.shown():
            while state.step < run.max_steps:
                plan = plan_step(run, state)
                batch = run.task.train_batch(state.batch)
                if batch.new_sequence:
                    state.mems = None
                run.model.set_unroll_steps(int(run.train.unroll_steps) if plan.unrolled else None)
                for group, base_lr in zip(run.stepper.optimizer.param_groups, run.base_lrs):
                    group["lr"] = run.schedule.lr(state.step, base_lr)
                started = time.perf_counter()
                outcome = run.stepper.step(batch.input, batch.target, mems=state.mems, plan=plan)
                seconds = time.perf_counter() - started
                stats = record_step(run, state, batch, outcome, plan, seconds)
                progress.update(outcome.loss, stats, outcome.jac_loss, seconds)
                if state.step < run.max_steps:
                    after_step(run, state)
                    if stop.agreed(info, device):
                        _stop_here(run, state, stop.signum)
            finish(run, state)
        return summarise(run, state, already_finished=False)
    finally:
        for sink in run.sinks:
            sink.close()


def check_resume(name: str, checkpoint: Path, resume: bool | str) -> bool:
    """Whether to resume: ``False`` never (and refuses to overwrite a checkpoint), ``True`` always
    (and refuses without one), ``"auto"`` when there is one (the previous one counts).

    Raises:
        ResumeError: the refusals above, with what to do instead.
    """
    exists = checkpoint.is_file() or ckpt.previous_path(checkpoint).is_file()
    if resume is False and exists:
        raise ResumeError(f"{checkpoint} already exists (run {name!r}); pass resume=true to continue it, or "
                          f"choose another hydra.run.dir (or out_dir / checkpoint) for a new run")
    if resume is True and not exists:
        raise ResumeError(f"resume=true but there is no checkpoint at {checkpoint} (nor "
                          f"{ckpt.previous_path(checkpoint).name}): check hydra.run.dir (or checkpoint=); "
                          f"resume=false starts afresh, resume=auto resumes only when there is one")
    if resume == "auto" and not exists:
        log.info("[%s] resume=auto: no checkpoint at %s, starting afresh", name, checkpoint)
    return exists


def start_state(run: Run, out_dir: Path, *, resuming: bool) -> TrainState:
    """The checkpoint's state when ``resuming`` (see :func:`_resume`), else a fresh one.

    Temporary files left by killed writers are removed first (rank 0).
    """
    if run.info.is_main:
        for directory in {run.checkpoint.parent, out_dir}:
            ckpt.remove_stale_temporaries(directory, (run.checkpoint.name, ckpt.previous_path(run.checkpoint).name,
                                                      run.metrics.path.name))
    barrier(run.info)
    if resuming:
        state = _resume(run)
    else:
        state = TrainState.fresh(int(run.cfg.seed))
        if run.info.is_main:
            run.metrics.truncate(None)
        _describe(run)
    run.elapsed_before = state.elapsed_s
    if run.cfg.get("logger") is not None and run.info.is_main:
        run.sinks.append(instantiate(run.cfg.logger, log_dir=out_dir / "tensorboard" / run.name,
                                     purge_step=state.step + 1 if resuming else None))
    return state


def _resume(run: Run) -> TrainState:
    """Load the newest usable checkpoint into the run's objects; the state it holds.

    A config that differs from the checkpoint's (see
    :func:`experiments.config.resume_changes`) is refused unless
    ``allow_changes=true``; then each change is logged and applied as given.
    """
    stored, path = ckpt.load_latest(run.checkpoint)
    changes = resume_changes(stored["config"], run.cfg)
    listing = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)
    if changes and not run.cfg.allow_changes:
        raise ResumeError(f"the config differs from the one {path} was trained with, in {len(changes)} "
                          f"setting(s):\n{listing}\nPass allow_changes=true to resume with these values, or "
                          f"restore the old ones")
    if changes:
        log.warning("[%s] resuming with %d changed setting(s), applied as given:\n%s", run.name, len(changes),
                    listing)
    run.model.load_state_dict(stored["model"])
    optimizer = run.stepper.optimizer
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(stored["optimizer"])
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)  # the moments come from the checkpoint, the hyperparameters from the config
    if run.stepper.scaler is not None and stored.get("scaler"):
        run.stepper.scaler.load_state_dict(stored["scaler"])
    if any(key.startswith("schedule.") for key, _, _ in changes):
        log.warning("[%s] the schedule changed: its state starts afresh", run.name)
    else:
        run.schedule.load_state_dict(stored["schedule"])
    state = TrainState.from_dict(stored["state"], mems=None)
    same_data = not any(key.startswith(("data.", "model.")) for key, _, _ in changes)
    if stored["world_size"] == run.info.world_size and same_data:
        mine = stored["ranks"][run.info.rank]
        state.mems = to_device(mine["mems"], run.device)
        restore_rng(mine["rng"], run.device)
    else:
        log.warning("[%s] %s was written by %d process(es) (this run: %d)%s: the carried memory and the RNG "
                    "streams restart (not a bit-exact resume)", run.name, path, stored["world_size"],
                    run.info.world_size, "" if same_data else " with other data or model settings")
    state.nonfinite_streak = 0
    if run.info.is_main:
        run.metrics.truncate(state.step)
    log.info("[%s] resumed from %s at step %d", run.name, path, state.step)
    return state


def _describe(run: Run) -> None:
    model, layer, t = run.model, run.model.deq, run.train
    n_params = sum(p.numel() for p in model.parameters())
    if run.explicit:
        mode = f"unrolled x{t.unroll_steps} throughout"
    else:
        mode = (f"unrolled x{t.unroll_steps} for {t.pretrain_steps} steps, then DEQ for "
                f"{run.max_steps - int(t.pretrain_steps)}: {layer.solver} to {layer.stop_mode} {layer.tol:g} in "
                f"<= {layer.max_iter} (eval <= {layer.eval_max_iter}), backward {layer.backward}")
    log.info("[%s] %s, %s parameters, %s, %d process(es), %s; %s; %d steps", run.name, type(model).__name__,
             f"{n_params:,}", run.device, run.info.world_size, t.precision, mode, run.max_steps)


def jac_weight(cfg: DictConfig, step: int) -> float:
    """The Jacobian regulariser's weight at ``step`` (steps taken so far).

    ``weight + increment * n``, where ``n`` counts the steps ``t`` with
    ``pretrain_steps < t <= step`` and ``t % increment_every == 0`` (when
    ``weight``, ``probability`` and ``increment_every`` are all positive): the
    2021 DEQ-Transformer code adds 0.1 to ``jac_loss_weight`` after every
    ``jac_incremental``-th step past the pretraining (locuslab/deq
    ``DEQ-Sequence/train_transformer.py``).
    """
    jr, pretrain = cfg.train.jac_reg, int(cfg.train.pretrain_steps)
    every = int(jr.increment_every)
    if not (jr.weight > 0 and jr.probability > 0 and every > 0) or step <= pretrain:
        return float(jr.weight)
    return float(jr.weight) + float(jr.increment) * (step // every - pretrain // every)


def plan_step(run: Run, state: TrainState) -> StepPlan:
    """Mode, forward budget and Jacobian regulariser of the next step (two draws from ``state.draws``)."""
    coin = float(torch.rand((), generator=state.draws))
    reduction = int(run.train.max_iter_reduction)
    cut = int(torch.randint(0, reduction + 1, (), generator=state.draws))
    if run.unrolled_at(state.step):
        return StepPlan(unrolled=True)
    jr = run.train.jac_reg
    return StepPlan(unrolled=False, max_iter=int(run.cfg.deq.max_iter) - cut if reduction else None,
                    jac_probes=int(jr.probes) if coin < float(jr.probability) else 0,
                    jac_weight=jac_weight(run.cfg, state.step))


def record_step(run: Run, state: TrainState, batch: Batch, outcome: StepOutcome, plan: StepPlan,
                seconds: float) -> dict[str, float]:
    """Advance the state past one step; the step's solver statistics (empty when skipped).

    Raises:
        NonFiniteTrainingError: the non-finite streak exceeded ``train.max_nonfinite``.
    """
    state.step, state.batch, state.epoch, state.mems = state.step + 1, state.batch + 1, batch.epoch, outcome.mems
    window = state.window
    window.steps += 1
    window.time_s += seconds
    if not outcome.ok:
        window.skipped += 1
        _skipped(run, state, outcome)
        return {}
    state.nonfinite_streak = 0
    window.nll += outcome.loss * outcome.n_tokens
    window.tokens += outcome.n_tokens
    result = run.model.deq.last_result
    stats = {**solver_stats(result), "grad_norm": outcome.grad_norm, "grad_norm_max": outcome.grad_norm}
    if outcome.jac_loss is not None:
        stats["jac_loss"] = outcome.jac_loss
    window.add(stats)
    if not plan.unrolled:
        for key, trace in (("train forward", result.trace), ("train backward", getattr(result.backward, "trace",
                                                                                      None))):
            if trace is not None:
                run.traces.setdefault(key, collections.deque(maxlen=TRACES_KEPT)).append(trace.float().cpu())
    return stats


def _skipped(run: Run, state: TrainState, outcome: StepOutcome) -> None:
    if outcome.overflow:
        state.overflow_skips += 1
        log.info("[%s] step %d: %s", run.name, state.step, outcome.reason)
        return
    state.nonfinite_total += 1
    state.nonfinite_streak += 1
    run.write({"kind": "nonfinite", "step": state.step, "reason": outcome.reason,
               "consecutive": state.nonfinite_streak, "total": state.nonfinite_total})
    log.warning("[%s] step %d: skipped (%s); %d in a row, %d in all", run.name, state.step, outcome.reason,
                state.nonfinite_streak, state.nonfinite_total)
    limit = int(run.train.max_nonfinite)
    if state.nonfinite_streak <= limit:
        return
    if state.checkpoint_step is None:
        where = "No checkpoint was written before the streak."
    else:
        where = (f"The last checkpoint, from before the streak, is {run.checkpoint} (step {state.checkpoint_step}): "
                 f"resume from it with resume=true (the streak counter restarts) after e.g. lowering "
                 f"optim.optimizer.lr or optim.clip (a changed setting needs allow_changes=true).")
    raise NonFiniteTrainingError(
        f"[{run.name}] {state.nonfinite_streak} non-finite steps in a row (more than train.max_nonfinite={limit}) "
        f"at step {state.step}; last: {outcome.reason}. Stopping instead of training a NaN model. {where}")


def _due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def after_step(run: Run, state: TrainState) -> None:
    """The log line, validation and checkpoint of a step before the last, when due."""
    if _due(state.step, int(run.train.log_interval)):
        log_window(run, state)
    if _due(state.step, int(run.train.eval_interval)) and "valid" in run.task.eval_splits:
        state.valid = run_evaluation(run, state, "valid").metrics
        run.schedule.observe(state.valid["loss"])
    if _due(state.step, int(run.train.ckpt_interval)) and state.nonfinite_streak == 0:
        save(run, state)


def log_window(run: Run, state: TrainState) -> None:
    """One ``train`` record for the steps since the last one; starts a new window."""
    w = state.window
    record = {"kind": "train", "step": state.step, "epoch": state.epoch,
              "lr": run.stepper.optimizer.param_groups[0]["lr"],
              "mode": "unrolled" if run.unrolled_at(state.step - 1) else "deq", "loss": w.loss,
              "ppl": math.exp(w.loss) if w.loss < 700 else math.inf, "tokens": w.tokens, **w.summary(),
              "skipped": w.skipped, "step_time_s": w.time_s / w.steps, "elapsed_s": run.elapsed()}
    if "jac_loss" in w.counts:
        record.update(jac_steps=w.counts["jac_loss"], jac_weight=jac_weight(run.cfg, state.step - 1))
    if run.stepper.scaler is not None:
        record.update(loss_scale=run.stepper.scaler.get_scale(), overflow_skips=state.overflow_skips)
    run.write(record)
    log.info(train_line(run.name, record))
    state.train_loss, state.window = w.loss, Window()


def run_evaluation(run: Run, state: TrainState, split: str, *, keep_traces: bool = False):
    """Evaluate ``split`` in the mode of the last step; log and write its record."""
    unrolled = run.unrolled_at(max(state.step - 1, 0))
    run.model.set_unroll_steps(int(run.train.unroll_steps) if unrolled else None)
    started = time.perf_counter()
    result = evaluate(run.model, run.task, split, precision=run.stepper.precision, info=run.info,
                      device=run.device, mem_len=run.train.eval_mem_len, max_batches=run.train.eval_max_batches,
                      keep_traces=keep_traces and not unrolled)
    record = {"kind": split, "step": state.step, "mode": "unrolled" if unrolled else "deq", **result.metrics,
              "eval_time_s": time.perf_counter() - started}
    run.write(record)
    log.info(eval_line(run.name, record, run.task.describe(result.metrics)))
    return result


def save(run: Run, state: TrainState) -> None:
    """Checkpoint the run (rank 0 writes; every rank contributes its memory and RNG)."""
    state.checkpoint_step, state.elapsed_s = state.step, run.elapsed()
    ranks = gather(rank_state(state, run.device), run.info)
    if run.info.is_main:
        scaler = run.stepper.scaler
        ckpt.save({"run": run.name, "state": state.to_dict(), "ranks": ranks, "world_size": run.info.world_size,
                   "model": run.model.state_dict(), "optimizer": run.stepper.optimizer.state_dict(),
                   "scaler": None if scaler is None else scaler.state_dict(),
                   "schedule": run.schedule.state_dict(),
                   "config": OmegaConf.to_container(run.cfg, resolve=True)}, run.checkpoint)
    barrier(run.info)


def finish(run: Run, state: TrainState) -> None:
    """The last log line, the final validation and test, and the checkpoint that records them."""
    if state.window.steps:
        log_window(run, state)
    final = {"valid": None, "test": None}
    if "valid" in run.task.eval_splits:
        result = run_evaluation(run, state, "valid", keep_traces=True)
        final["valid"] = state.valid = result.metrics
        if result.traces:
            run.traces["valid forward"] = result.traces
    if bool(run.train.test_at_end) and "test" in run.task.eval_splits:
        final["test"] = run_evaluation(run, state, "test").metrics
    state.final = final
    # Even after skipped last steps (the run is over; resuming it must only report it). The
    # checkpoint from before them stays as checkpoint.prev.pt.
    save(run, state)


def _stop_here(run: Run, state: TrainState, signum: int) -> None:
    name = signal.Signals(signum).name
    if state.nonfinite_streak == 0:
        save(run, state)
        where = f"checkpoint {run.checkpoint} at step {state.step}"
    else:
        where = f"no checkpoint during a non-finite streak; the last is at step {state.checkpoint_step}"
    raise TrainingInterrupted(f"[{run.name}] stopped by {name} after step {state.step} ({where}); continue with "
                              f"resume=true", signum)


def summarise(run: Run, state: TrainState, *, already_finished: bool) -> RunSummary:
    final = state.final or {"valid": state.valid, "test": None}
    pretrain = int(run.train.pretrain_steps)
    describe = run.task.describe
    return RunSummary(
        # A finished run reports the time recorded in its final checkpoint, whichever process asks.
        run=run.name, steps=state.step, time_s=run.elapsed() if state.final is None else state.elapsed_s,
        train_loss=state.train_loss, valid=final["valid"], test=final["test"],
        valid_text=describe(final["valid"]) if final["valid"] else None,
        test_text=describe(final["test"]) if final["test"] else None, nonfinite_steps=state.nonfinite_total,
        checkpoint=str(run.checkpoint), already_finished=already_finished,
        switch_step=pretrain if not run.explicit and 0 < pretrain < state.step else None,
        traces={k: list(v) for k, v in run.traces.items()})


class _StopSignal:
    """SIGINT / SIGTERM while training: remember it and stop after the step; a second one interrupts at once.

    Installed only in the main thread (signal handlers cannot be set elsewhere).
    """

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s: stopping after this step with a checkpoint (again to stop at once, without one)",
                    signal.Signals(signum).name)

    def agreed(self, info: DistInfo, device: torch.device) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step)."""
        if not info.enabled:
            return self.signum is not None
        anyone = all_reduce([float(self.signum or 0)], info, device, op="max")[0]
        if anyone and self.signum is None:
            self.signum = int(anyone)
        return bool(anyone)
