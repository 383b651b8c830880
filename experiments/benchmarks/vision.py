"""Client benchmark: an image-classification DEQ on scikit-learn's digits.

Per-sample stopping (``deq.DEQLayer``) against the batch-wide stop of the
implicit-layers tutorial (NeurIPS 2020, chapter 4), on one model and one
training run each, from the same initial weights, on the same batches.

The model is the tutorial's, scaled to the 8 x 8 digits::

    conv3x3(1 -> C) -> BatchNorm -> DEQ(f) -> BatchNorm -> AvgPool(2) -> Linear(16 C -> 10)

with the ResNet-style cell, weight-tied and fed the input ``x`` (the stem's
output) at every step::

    y      = GN_1(relu(conv_1(z)))                 conv_1: C -> C_inner, 3x3
    f(z,x) = GN_3(relu(z + GN_2(x + conv_2(y))))   conv_2: C_inner -> C, 3x3

with GroupNorm (per sample, so that ``f`` is batch-separable) and the conv
weights drawn from N(0, 0.01^2) as in the tutorial. The BatchNorms sit outside
the DEQ; nothing inside ``f`` mixes samples.

The two DEQs solve the same equation with Anderson (memory 5, ridge 1e-4,
beta 1), tol 1e-2 and 25 iterations (the tutorial's settings), forward and
backward:

- ``batch-wide``: written here after the tutorial's recipe. One residual
  ``||f(Z) - Z|| / (1e-5 + ||f(Z)||)`` over the whole batch stops the solve;
  classic type-II Anderson (with a ridge scaled to the residuals, see
  :func:`batch_anderson`); the implicit backward solves ``g = J^T g + dL/dz*``
  the same way, through a hook on the one re-attached graph of ``f``.
- ``DEQLayer``: ``deq.DEQLayer(solver=Anderson(m=5, lam=1e-4),
  backward=Implicit(Anderson(m=5, lam=1e-4), tol=1e-2, max_iter=25))`` with
  ``stop_mode="rel"``: each sample stops on its own residual.
- ``DEQLayer(compact=True)``: the same layer with ``f`` run only on the rows
  still iterating. This row appears only when ``DEQLayer`` accepts ``compact``.

Columns (means over the batches of the last training epoch, or over the test
set for the forward):

- ``rows``: rows of ``f`` evaluated per batch in the forward, counted by a
  wrapper around ``f`` (solver calls plus the final call). ``calls``: calls of
  ``f`` per batch. ``nstep``: f-calls charged per sample (``SolverResult.nstep``;
  every sample is charged every call for the batch-wide stop).
- ``alone``: the rows the samples need when each is solved alone,
  ``sum_b (nstep_b + 1)``, for the per-sample rows. ``rows / alone`` is the
  price of running ``f`` on the whole batch; the active-set goal is <= 1.05.
- ``b_rows``: rows pushed back through the graph of ``f`` per training step
  (the adjoint VJPs plus the final pass to the parameters), counted by a hook
  the same wrapper puts on ``z``.
- ``fwd_ms``: eval-mode forward (no grad) of one test batch, median over
  passes. ``step_ms``: one training step (forward, backward, Adam), median
  over the steps of the run. The variants take turns on every batch, so a change
  of machine load hits them alike.
- ``acc``: test accuracy after the fixed number of epochs; ``conv``: fraction
  of test samples whose forward solve converged.

Usage::

    python experiments/benchmarks/vision.py [--quick] [--out DIR] [--epochs N]

Before training it checks that every variant gives the same parameter gradient
at a tight tolerance (float64, tol 1e-11), so the baseline's numbers can be
trusted. Writes ``vision.json`` (and ``vision_nstep.png`` when matplotlib is
present) into ``--out``. CPU, one thread, float32.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq import DEQLayer
from deq.grad import Implicit
from deq.solvers import Anderson


@dataclass(frozen=True)
class Config:
    channels: int = 24
    inner: int = 48
    groups: int = 8
    batch: int = 64
    epochs: int = 6
    lr: float = 1e-3
    n_train: int | None = None  # None: every training image
    n_test: int = 448  # 7 batches of 64; the other 1349 images train
    tol: float = 1e-2
    max_iter: int = 25
    m: int = 5
    lam: float = 1e-4
    fwd_passes: int = 5
    seed: int = 0


QUICK = Config(channels=8, inner=16, groups=4, epochs=1, n_train=192, n_test=128, fwd_passes=2)


# ---------------------------------------------------------------- data and model


def digits(cfg: Config) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): scikit-learn's 8x8 digits, standardised, a seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit("this benchmark needs scikit-learn (in the dev extra): pip install scikit-learn") from err

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
    test, train = order[:cfg.n_test], order[cfg.n_test:]
    if cfg.n_train is not None:
        train = train[:cfg.n_train]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


class ResNetCell(nn.Module):
    """``f(z, x) = GN3(relu(z + GN2(x + conv2(GN1(relu(conv1(z)))))))``, batch-separable."""

    def __init__(self, channels: int, inner: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        # Small weights start f close to z -> GN3(relu(z + GN2(x))): a contraction.
        nn.init.normal_(self.conv1.weight, std=0.01)
        nn.init.normal_(self.conv2.weight, std=0.01)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        y = self.norm1(F.relu(self.conv1(z)))
        return self.norm3(F.relu(z + self.norm2(x + self.conv2(y))))


class RowCounter(nn.Module):
    """Wraps ``f(z, x)``: counts its calls and rows, and the rows of gradient sent back through it."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f
        self.reset()

    def reset(self) -> None:
        self.calls, self.rows, self.back_rows = 0, 0, 0

    def _count_back(self, grad: Tensor) -> None:
        self.back_rows += grad.shape[0]

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        self.rows += z.shape[0]
        if torch.is_grad_enabled() and z.requires_grad:
            z.register_hook(self._count_back)
        return self.f(z, x)


def build_model(cfg: Config, make_deq: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, RowCounter]:
    """The classifier around ``make_deq(counted cell)``; the same weights for every seed-equal call."""
    torch.manual_seed(cfg.seed)
    cell = RowCounter(ResNetCell(cfg.channels, cfg.inner, cfg.groups))
    stem = nn.Sequential(nn.Conv2d(1, cfg.channels, 3, padding=1), nn.BatchNorm2d(cfg.channels))
    head = nn.Sequential(nn.BatchNorm2d(cfg.channels), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(cfg.channels * 16, 10))
    return nn.Sequential(stem, make_deq(cell), head), cell


# ---------------------------------------------------------------- the batch-wide baseline (the tutorial's recipe)


def batch_anderson(g: Callable[[Tensor], Tensor], z0: Tensor, *, m: int, lam: float, tol: float,
                   max_iter: int) -> tuple[Tensor, int, float]:
    """Type-II Anderson (beta = 1) on a whole batch, stopped by ONE residual for the batch.

    Each sample gets its own mixing weights ``alpha = argmin ||sum_i alpha_i G_i||``
    with ``sum_i alpha_i = 1`` over the last ``m`` residuals
    ``G_i = g(z_i) - z_i``; the solve stops when
    ``||g(Z) - Z|| / (1e-5 + ||g(Z)||) < tol`` with the norms over the whole
    batch, so a sample far from its fixed point can hide behind the others.

    The ridge is ``lam * max_i ||G_i||^2`` per sample, not the tutorial's
    absolute ``lam``: gradients are small (about 1e-3 per entry here), and an
    absolute 1e-4 then dominates the Gram matrix and stalls the backward solve
    (25 of 25 iterations against 5 with no ridge, measured on the ``--quick``
    model at init). ``deq``'s Anderson scales its ridge likewise, so the two
    DEQs differ in the stopping rule, not in this.

    Returns:
        The last iterate ``z_k`` (whose residual was tested), the calls of ``g``
        and the final batch residual.
    """
    shape, batch = z0.shape, z0.shape[0]
    xs = z0.new_zeros(batch, m, z0[0].numel())
    fs = torch.zeros_like(xs)
    xs[:, 0] = z0.reshape(batch, -1)
    fs[:, 0] = g(z0).reshape(batch, -1)
    calls = 1
    for k in range(1, max_iter):
        slot = (k - 1) % m
        res = (fs[:, slot] - xs[:, slot]).norm().item() / (1e-5 + fs[:, slot].norm().item())
        if res < tol:
            return xs[:, slot].reshape(shape), calls, res
        n = min(k, m)
        resid = fs[:, :n] - xs[:, :n]
        gram = resid @ resid.transpose(1, 2)
        scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(z0.dtype).tiny)
        gram = gram + (lam * scale)[:, None, None] * torch.eye(n, dtype=z0.dtype, device=z0.device)
        w = torch.linalg.solve(gram, torch.ones(batch, n, 1, dtype=z0.dtype, device=z0.device))
        alpha = w / w.sum(dim=1, keepdim=True)
        new = (alpha.transpose(1, 2) @ fs[:, :n]).squeeze(1)
        xs[:, k % m] = new
        fs[:, k % m] = g(new.reshape(shape)).reshape(batch, -1)
        calls += 1
    slot = (max_iter - 1) % m
    res = (fs[:, slot] - xs[:, slot]).norm().item() / (1e-5 + fs[:, slot].norm().item())
    return xs[:, slot].reshape(shape), calls, res


class BatchWideDEQ(nn.Module):
    """The tutorial's DEQ: batch-wide Anderson forward, implicit backward through a hook.

    The forward solves under ``no_grad`` and re-attaches one call of ``f`` at
    ``z*``. A hook on that output replaces the incoming gradient ``v`` by the
    solution of ``g = J^T g + v`` (VJPs through the same graph), which autograd
    then pushes to the parameters and ``x``: the IFT gradient.
    """

    def __init__(self, f: nn.Module, *, m: int, lam: float, tol: float, max_iter: int):
        super().__init__()
        self.f = f
        self.options = dict(m=m, lam=lam, tol=tol, max_iter=max_iter)
        self.nstep = self.b_nstep = 0
        self.residual = float("nan")

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            z_star, self.nstep, self.residual = batch_anderson(lambda z: self.f(z, x), torch.zeros_like(x),
                                                               **self.options)
        if not torch.is_grad_enabled():
            return self.f(z_star, x)
        z_in = z_star.requires_grad_()
        fz = self.f(z_in, x)

        def adjoint(v: Tensor) -> Tensor:
            def step(u: Tensor) -> Tensor:
                return torch.autograd.grad(fz, z_in, u, retain_graph=True)[0] + v

            g, self.b_nstep, _ = batch_anderson(step, torch.zeros_like(v), **self.options)
            return g

        # The hook goes on a view of f(z*): on f(z*) itself it would also fire inside its own VJPs.
        out = fz.view_as(fz)
        out.register_hook(adjoint)
        return out


# ---------------------------------------------------------------- the variants


def _tutorial(cell: nn.Module, cfg: Config) -> nn.Module:
    return BatchWideDEQ(cell, m=cfg.m, lam=cfg.lam, tol=cfg.tol, max_iter=cfg.max_iter)


def _deq_layer(cell: nn.Module, cfg: Config, **options) -> nn.Module:
    solver = Anderson(m=cfg.m, lam=cfg.lam)
    return DEQLayer(cell, solver=solver, backward=Implicit(solver=solver, tol=cfg.tol, max_iter=cfg.max_iter),
                    tol=cfg.tol, max_iter=cfg.max_iter, stop_mode="rel", on_nonconvergence="ignore", **options)


def variants() -> dict[str, Callable[[nn.Module, Config], nn.Module]]:
    """Label -> builder of the DEQ around a counted cell."""
    out = {"batch-wide (tutorial)": _tutorial, "DEQLayer": _deq_layer}
    if "compact" in inspect.signature(DEQLayer).parameters:
        out["DEQLayer(compact=True)"] = functools.partial(_deq_layer, compact=True)
    return out


def _deq_of(model: nn.Module) -> nn.Module:
    return model[1]


def _per_sample_nstep(deq: nn.Module, batch: int) -> Tensor:
    """(B,) f-calls charged to each sample in the last forward."""
    if isinstance(deq, DEQLayer):
        return deq.last_result.nstep.double()
    return torch.full((batch,), float(deq.nstep), dtype=torch.float64)


# ---------------------------------------------------------------- measuring


@dataclass
class Tally:
    """Sums over batches; ``means()`` divides by the batch count."""

    batches: int = 0
    rows: int = 0
    calls: int = 0
    back_rows: int = 0
    alone: float = 0.0
    nstep: float = 0.0
    converged: float = 0.0

    def add(self, counter: RowCounter, nstep: Tensor, converged: float) -> None:
        self.batches += 1
        self.rows += counter.rows
        self.calls += counter.calls
        self.back_rows += counter.back_rows
        self.alone += float((nstep + 1).sum())  # + 1: the final call of f at z*
        self.nstep += float(nstep.mean())
        self.converged += converged

    def means(self) -> dict[str, float]:
        n = max(self.batches, 1)
        return {k: v / n for k, v in asdict(self).items() if k != "batches"}


def _converged(deq: nn.Module, tol: float) -> float:
    if isinstance(deq, DEQLayer):
        return float(deq.last_result.converged.double().mean())
    return float(deq.residual < tol)


def train(models: dict[str, tuple[nn.Module, RowCounter]], data, cfg: Config) -> dict[str, dict]:
    """Train every model on the same batches, taking turns per batch; per-variant step times and tallies."""
    x_train, y_train = data[0], data[1]
    opts = {k: torch.optim.Adam(m.parameters(), lr=cfg.lr) for k, (m, _) in models.items()}
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    log = {k: {"step_s": [], "loss": [], "epochs": []} for k in models}
    n_batches = len(y_train) // cfg.batch
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(y_train), generator=gen)
        tallies = {k: Tally() for k in models}
        losses = {k: 0.0 for k in models}
        for i in range(n_batches):
            idx = order[i * cfg.batch:(i + 1) * cfg.batch]
            xb, yb = x_train[idx], y_train[idx]
            for name, (model, counter) in models.items():
                model.train()
                counter.reset()
                start = time.perf_counter()
                loss = F.cross_entropy(model(xb), yb)
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                opts[name].step()
                log[name]["step_s"].append(time.perf_counter() - start)
                deq = _deq_of(model)
                tallies[name].add(counter, _per_sample_nstep(deq, len(yb)), _converged(deq, cfg.tol))
                losses[name] += loss.item()
        for name in models:
            log[name]["epochs"].append(dict(epoch=epoch + 1, loss=losses[name] / n_batches,
                                            **tallies[name].means()))
            print(f"  epoch {epoch + 1}/{cfg.epochs} {name:<24} loss {losses[name] / n_batches:.4f} "
                  f"rows/batch {tallies[name].means()['rows']:.0f}", flush=True)
    return log


@torch.no_grad()
def evaluate(models: dict[str, tuple[nn.Module, RowCounter]], data, cfg: Config) -> dict[str, dict]:
    """Test accuracy, forward tallies and forward time per batch (passes interleaved across models)."""
    x_test, y_test = data[2], data[3]
    n_batches = len(y_test) // cfg.batch
    times = {k: [] for k in models}
    out = {}
    for p in range(cfg.fwd_passes):
        for name, (model, counter) in models.items():
            model.eval()
            tally, correct, elapsed = Tally(), 0, 0.0
            nsteps = []
            for i in range(n_batches):
                xb, yb = x_test[i * cfg.batch:(i + 1) * cfg.batch], y_test[i * cfg.batch:(i + 1) * cfg.batch]
                counter.reset()
                start = time.perf_counter()
                logits = model(xb)
                elapsed += time.perf_counter() - start
                deq = _deq_of(model)
                nstep = _per_sample_nstep(deq, len(yb))
                nsteps.append(nstep)
                tally.add(counter, nstep, _converged(deq, cfg.tol))
                correct += int((logits.argmax(1) == yb).sum())
            times[name].append(elapsed / n_batches)
            out[name] = dict(acc=correct / (n_batches * cfg.batch), **tally.means(),
                             nstep_hist=torch.cat(nsteps).long().bincount(minlength=cfg.max_iter + 1).tolist())
    for name in models:
        out[name]["fwd_s"] = statistics.median(times[name])
        out[name]["fwd_s_passes"] = times[name]
    return out


def check_gradients(cfg: Config, data) -> dict[str, float]:
    """Relative difference of each variant's parameter gradient to the first's, float64, tol 1e-11.

    At a tight tolerance every variant computes the same IFT gradient; this
    checks that the hand-written baseline is right before its numbers count.
    """
    tight = Config(**{**asdict(cfg), "tol": 1e-11, "max_iter": 200})
    x, y = data[0][:8].double(), data[1][:8]
    grads = {}
    for name, make in variants().items():
        model, _ = build_model(tight, functools.partial(make, cfg=tight))
        model.double().train()
        F.cross_entropy(model(x), y).backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = next(iter(grads.values()))
    return {name: float((g - ref).norm() / ref.norm()) for name, g in grads.items()}


# ---------------------------------------------------------------- report


def print_table(rows: list[dict], cfg: Config) -> None:
    print(f"\ndigits, batch {cfg.batch}, C = {cfg.channels}, C_inner = {cfg.inner}, {cfg.epochs} epoch(s), "
          f"Anderson m={cfg.m}, tol {cfg.tol}, max_iter {cfg.max_iter}")
    head = (f"{'variant':<24} {'rows':>7} {'alone':>7} {'ratio':>6} {'calls':>6} {'nstep':>6} {'b_rows':>7} "
            f"{'fwd_ms':>7} {'step_ms':>8} {'acc':>6} {'conv':>5}")
    print("forward on the test set (rows, alone, calls, nstep, conv: per test batch); b_rows, step_ms: training")
    print(head)
    print("-" * len(head))
    for r in rows:
        t, tr = r["test"], r["train_last_epoch"]
        ratio = f"{t['rows'] / t['alone']:>6.2f}" if r["per_sample"] else f"{'-':>6}"
        alone = f"{t['alone']:>7.0f}" if r["per_sample"] else f"{'-':>7}"
        print(f"{r['variant']:<24} {t['rows']:>7.0f} {alone} {ratio} {t['calls']:>6.1f} {t['nstep']:>6.1f} "
              f"{tr['back_rows']:>7.0f} {t['fwd_s'] * 1e3:>7.2f} {r['step_s'] * 1e3:>8.1f} {t['acc']:>6.3f} "
              f"{t['converged']:>5.2f}")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['variant']} / {base['variant']}: rows {r['test']['rows'] / base['test']['rows']:.2f}x, "
              f"fwd time {r['test']['fwd_s'] / base['test']['fwd_s']:.2f}x, "
              f"step time {r['step_s'] / base['step_s']:.2f}x")


def plot_nstep(rows: list[dict], cfg: Config, path: Path) -> bool:
    """Histogram of per-sample nstep on the test set, with each variant's mean calls per batch."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping", path.name)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(range(cfg.max_iter + 1))
    for i, r in enumerate(rows):
        color = f"C{i}"
        if r["per_sample"]:
            ax.bar([s + 0.3 * (i - 1) for s in steps], r["test"]["nstep_hist"], width=0.3, color=color,
                   label=f"{r['variant']}: nstep per sample")
        ax.axvline(r["test"]["calls"] - 1, color=color, linestyle="--",
                   label=f"{r['variant']}: solver calls per batch (mean)")
    ax.set_xlabel("f-calls by the forward solver")
    ax.set_ylabel("test samples")
    ax.set_xticks(steps[::max(1, len(steps) // 13)])
    ax.legend(fontsize=7)
    ax.set_title(f"digits DEQ: per-sample cost vs batch cost (tol {cfg.tol})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data, one epoch (seconds)")
    parser.add_argument("--out", default="bench_out", help="directory for vision.json")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 6, quick 1)")
    args = parser.parse_args()
    cfg = QUICK if args.quick else Config()
    if args.epochs is not None:
        cfg = Config(**{**asdict(cfg), "epochs": args.epochs})
    torch.set_num_threads(1)
    started, load_before = time.time(), os.getloadavg()

    data = digits(cfg)
    models = {name: build_model(cfg, functools.partial(make, cfg=cfg)) for name, make in variants().items()}
    first = next(iter(models.values()))[0].state_dict()
    same_init = all(torch.equal(first[k], m.state_dict()[k]) for m, _ in models.values() for k in first)
    print(f"{len(data[1])} training and {len(data[3])} test images; variants: {', '.join(models)}; "
          f"same initial weights: {same_init}")
    if not same_init:
        raise RuntimeError("the variants do not start from the same weights")

    grad_check = check_gradients(cfg, data)
    print("gradient vs the first variant at tol 1e-11 (float64, 8 images), relative difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in grad_check.items()))
    if max(grad_check.values()) > 1e-6:
        raise RuntimeError(f"the variants disagree on the gradient: {grad_check}")

    log = train(models, data, cfg)
    test = evaluate(models, data, cfg)
    rows = [dict(variant=name, per_sample=isinstance(_deq_of(m), DEQLayer), test=test[name],
                 train_last_epoch=log[name]["epochs"][-1], epochs=log[name]["epochs"],
                 step_s=statistics.median(log[name]["step_s"]))
            for name, (m, _) in models.items()]
    print_table(rows, cfg)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot_nstep(rows, cfg, out / "vision_nstep.png")
    payload = dict(
        benchmark="vision", quick=args.quick, config=asdict(cfg), same_init=same_init, grad_check=grad_check,
        env=dict(torch=torch.__version__, threads=torch.get_num_threads(), python=platform.python_version(),
                 machine=platform.machine(), cpus=os.cpu_count(), load_before=load_before,
                 load_after=os.getloadavg(), seconds=time.time() - started),
        rows=rows)
    (out / "vision.json").write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out / 'vision.json'}" + (f" and {out / 'vision_nstep.png'}" if plotted else "")
          + f" ({time.time() - started:.0f} s; load average before {load_before[0]:.1f}, "
            f"after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
