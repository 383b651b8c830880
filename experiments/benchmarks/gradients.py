"""How exact each backward pass is, and what it costs.

(a) Accuracy, the phantom-gradient paper's synthetic setting (Geng et al., On
    Training Implicit Models, NeurIPS 2021, Figure 1): ``z = tanh(W z + U x + b)``
    of width 256, batch 64, with ``||W||_2 = 0.9`` (``problems.TanhLayer``:
    ``W`` symmetric, made a parameter here; input scale 0.5, so ``tanh`` is
    well out of its linear range and the Jacobian at ``z*`` has spectral
    radius ~0.72), float64, a fixed random loss (half the squared distance to
    a random target). The exact gradient is Implicit at ``tol=1e-12`` (forward
    too), cross-checked against autograd through 600 unrolled steps. Reported:
    the cosine similarity to it of the gradients w.r.t. ``W`` and ``U`` of
    UPG(k, damping) and NPG(k, damping) for k = 1..10, damping in {0.5, 1.0}
    (JFB is UPG(1, 1.0)), and of Implicit at the training setting (forward
    ``tol=1e-4``, backward ``tol=1e-6``). A table and a PNG. At an exact fixed
    point UPG's iterates never leave ``z*``, so UPG and NPG coincide; the
    table shows it.

(b) Cost, on a Transformer-block equilibrium (``problems.transformer_block``:
    d_model 128, 4 heads, seq 64, batch 8, float32) for Implicit (backward
    Anderson ``tol=1e-6`` with a budget of 200 so that it gets there),
    UPG(5, 0.5), NPG(5, 0.5), JFB and the explicit weight-tied twin unrolled
    L = 6, 12, 24 times (``layer.unroll_steps``), all on the same weights,
    forward Anderson ``tol=1e-4``, loss the mean squared distance to a random
    target. Per row: backward time and whole training-step time (median of
    ``--repeats``, one thread, methods interleaved), as ratios to Implicit
    measured in the same run; batched f-calls and VJPs through f (counted by
    a wrapper, not inferred); bytes saved for backward
    (``saved_tensors_hooks``, each storage once; with and without parameters
    and x; at ``max_iter`` 10 and 100 for the DEQ rows, every iteration run);
    and a whole step's peak memory, two ways on CPU: the peak of the live
    saved-tensor bytes (what the graph holds), and the peak of all live tensor
    storages allocated during the step (a ``TorchDispatchMode`` tracker:
    solver buffers and backward temporaries included, the CPU stand-in for
    ``torch.cuda.max_memory_allocated``, which is reported too on CUDA).
    Two regimes: the block at its default initialisation (spectral radius of
    J at z* ~0.71; forward ~12, backward ~18 Anderson steps) and the same
    block with its input scaled by 0.3 (spectral radius ~0.96; forward ~43
    steps, backward ~80 on average and up to the 200 cap: the hard end of
    what a trained DEQ-Transformer meets, whose published budgets are 30
    forward / 35 backward).

Run::

    python experiments/benchmarks/gradients.py [--quick] [--out DIR]

Writes ``gradients.json`` and ``gradients_cos_sim.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import deq
from deq import JFB, NPG, UPG, DEQLayer, Implicit
from deq.reg import spectral_radius
from experiments.benchmarks import problems  # the shared equilibrium functions

MiB = 2 ** 20


# ----------------------------------------------------------------------------
# Measuring tools

class SavedTensors:
    """Tensors autograd saves for backward: distinct storages, and the peak of the live ones.

    ``storages`` maps each storage saved inside the context to its size (one
    storage counts once however many tensors view it). Every saved tensor is
    packed into a holder whose deletion (when autograd frees that part of the
    graph) releases it, so ``peak`` is the largest sum of live saved storages
    seen while the graph built and was consumed.
    """

    def __init__(self):
        self.storages: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _pack(self, t: Tensor):
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        self.storages[ptr] = n
        if self._refs.get(ptr, 0) == 0:
            self.live += n
            self.peak = max(self.peak, self.live)
        self._refs[ptr] = self._refs.get(ptr, 0) + 1
        return _Held(t, self, ptr, n)

    def _release(self, ptr: int, n: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            self.live -= n

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def total(self, exclude: set[int] = frozenset()) -> int:
        return sum(n for p, n in self.storages.items() if p not in exclude)


class _Held:
    __slots__ = ("t", "meter", "ptr", "n")

    def __init__(self, t, meter, ptr, n):
        self.t, self.meter, self.ptr, self.n = t, meter, ptr, n

    def __del__(self):
        self.meter._release(self.ptr, self.n)


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the context and still alive.

    Every op's outputs are inspected; a storage that is not one of the op's
    inputs' (views and in-place results are not allocations) is counted until
    it is freed (``weakref.finalize`` on the storage). Tensors that existed
    before (parameters, inputs) are not counted, like a CUDA baseline.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            if n == 0 or ptr in inputs or ptr in self.live:
                continue
            self.live[ptr] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._free, ptr)
        return out


class _CountVJP(torch.autograd.Function):
    """Identity on f's output; counts the gradients that flow back through it."""

    @staticmethod
    def forward(ctx, out, counter):
        ctx.counter = counter
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.vjps += 1
        return grad, None


class Counting(nn.Module):
    """Wraps f: counts batched calls of f, and VJPs through f (each backward pass through one f graph)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.vjps = 0

    def forward(self, z, x):
        self.calls += 1
        out = self.inner(z, x)
        return _CountVJP.apply(out, self) if out.requires_grad else out


def _cos(a: list[Tensor], b: list[Tensor]) -> float:
    u = torch.cat([t.reshape(-1) for t in a])
    v = torch.cat([t.reshape(-1) for t in b])
    return float(u @ v / (u.norm() * v.norm()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------
# (a) accuracy

def accuracy(*, width: int, batch: int, n_in: int, rho: float, input_scale: float, ks: list[int],
             dampings: list[float], unroll: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cell = problems.TanhLayer(width, n_in, rho=rho, input_scale=input_scale, generator=gen).double()
    w = cell.W
    del cell.W  # a buffer in problems.py: here W is trained, so make it a parameter
    cell.W = nn.Parameter(w.clone())
    raw = torch.randn(batch, n_in, generator=gen, dtype=torch.float64)
    target = torch.randn(batch, width, generator=gen, dtype=torch.float64) * 0.1
    groups = {"W": ["W"], "U": ["U"], "all": ["W", "U", "b"]}
    params = [cell.W, cell.U, cell.b]

    def grads(backward, *, tol, max_iter, unroll_steps=None):
        layer = DEQLayer(cell, solver="anderson", backward=backward, tol=tol, max_iter=max_iter,
                         on_nonconvergence="ignore")
        layer.unroll_steps = unroll_steps
        x = cell.inject(raw)  # inside the graph: U and b get their gradients through x
        z = layer(x)
        loss = 0.5 * (z - target).pow(2).sum() / batch
        g = torch.autograd.grad(loss, params)
        return dict(zip(("W", "U", "b"), g)), layer.last_result

    exact, res = grads(Implicit(tol=1e-12, max_iter=500), tol=1e-12, max_iter=500)
    z_star = res.z
    rho_j = float(problems.tanh_spectral_radius(cell.W.detach(), z_star).max())
    unrolled, _ = grads("jfb", tol=1e-12, max_iter=500, unroll_steps=unroll)
    practical, pres = grads(Implicit(tol=1e-6, max_iter=100), tol=1e-4, max_iter=100)

    def cos_all(g):
        return {group: _cos([g[n] for n in names], [exact[n] for n in names]) for group, names in groups.items()}

    out = {
        "setting": dict(width=width, batch=batch, n_in=n_in, rho_W=rho, input_scale=input_scale,
                        rho_J_at_z_star=rho_j, dtype="float64", loss="0.5 * ||z - target||^2 / batch",
                        exact="Implicit(tol=1e-12), forward tol=1e-12", unroll=unroll,
                        exact_backward_nstep_mean=float(res.backward.nstep.double().mean()),
                        exact_backward_residual_max=float(res.backward.residual.max())),
        "implicit_exact_vs_unrolled": cos_all(unrolled),
        "implicit_exact_vs_unrolled_max_abs_diff": max(float((exact[n] - unrolled[n]).abs().max())
                                                       for n in exact),
        "implicit_practical": dict(cos=cos_all(practical), forward_tol=1e-4, backward_tol=1e-6,
                                   backward_nstep_mean=float(pres.backward.nstep.double().mean())),
        "phantom": [],
    }
    for k in ks:
        for damping in dampings:
            for name, cls in (("UPG", UPG), ("NPG", NPG)):
                g, _ = grads(cls(k=k, damping=damping), tol=1e-12, max_iter=500)
                out["phantom"].append(dict(method=name, k=k, damping=damping, cos=cos_all(g)))
    return out


def print_accuracy(acc: dict) -> None:
    s = acc["setting"]
    print(f"(a) cosine similarity to the exact gradient: tanh width {s['width']}, batch {s['batch']}, "
          f"||W||_2 = {s['rho_W']}, rho(J(z*)) = {s['rho_J_at_z_star']:.4f}, float64")
    u = acc["implicit_exact_vs_unrolled"]
    print(f"    exact = Implicit(tol=1e-12): vs autograd through {s['unroll']} unrolled steps: cos W "
          f"{u['W']:.12f}, U {u['U']:.12f}; max |diff| {acc['implicit_exact_vs_unrolled_max_abs_diff']:.2e}")
    p = acc["implicit_practical"]
    print(f"    Implicit (forward tol 1e-4, backward tol 1e-6, {p['backward_nstep_mean']:.1f} backward steps): "
          f"cos W {p['cos']['W']:.8f}, U {p['cos']['U']:.8f}")
    rows = acc["phantom"]
    ks = sorted({r["k"] for r in rows})
    dampings = sorted({r["damping"] for r in rows})
    for group in ("W", "U"):
        cols = [(m, d) for m in ("UPG", "NPG") for d in dampings]
        head = f"  {'grad ' + group:7s} {'k':>3s} " + " ".join(f"{m + '(k,' + format(d, 'g') + ')':>13s}"
                                                             for m, d in cols)
        print(head)
        print("  " + "-" * (len(head) - 2))
        for k in ks:
            vals = []
            for m, d in cols:
                r = next(r for r in rows if r["method"] == m and r["k"] == k and r["damping"] == d)
                vals.append(f"{r['cos'][group]:13.6f}")
            print(f"  {'':7s} {k:3d} " + " ".join(vals))
    diff = max(abs(a["cos"]["all"] - b["cos"]["all"]) for a in rows for b in rows
               if a["method"] == "UPG" and b["method"] == "NPG" and a["k"] == b["k"]
               and a["damping"] == b["damping"])
    print(f"    UPG and NPG agree at the exact fixed point (all iterates of UPG stay at z*): "
          f"max |cos difference| {diff:.1e}")


def plot_accuracy(acc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    rows = acc["phantom"]
    for ax, group in zip(axes, ("W", "U")):
        for method, style in (("UPG", "-o"), ("NPG", "--x")):
            for damping in sorted({r["damping"] for r in rows}):
                sel = sorted((r for r in rows if r["method"] == method and r["damping"] == damping),
                             key=lambda r: r["k"])
                ax.plot([r["k"] for r in sel], [r["cos"][group] for r in sel], style,
                        label=f"{method}(k, {damping:g})", markersize=4)
        ax.axhline(acc["implicit_practical"]["cos"][group], color="k", lw=0.8, ls=":",
                   label="Implicit (bwd tol 1e-6)")
        ax.set_xlabel("k (unrolled steps / Neumann terms)")
        ax.set_title(f"gradient w.r.t. {group}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine similarity to the exact gradient")
    axes[1].legend(fontsize=8, loc="lower right")
    s = acc["setting"]
    fig.suptitle(f"Phantom gradients, tanh(Wz + Ux + b), width {s['width']}, ||W||_2 = {s['rho_W']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------
# (b) cost

def _rows(unrolls: list[int]) -> list[tuple[str, object, int | None]]:
    # A budget the adjoint solve does not hit in either regime (it stops at tol 1e-6): the target is
    # about Implicit *at* tol 1e-6; the library default max_iter=50 stops short in the hard regime.
    rows = [("Implicit", Implicit(tol=1e-6, max_iter=200), None), ("UPG(5,0.5)", UPG(k=5, damping=0.5), None),
            ("NPG(5,0.5)", NPG(k=5, damping=0.5), None), ("JFB", JFB(), None)]
    return rows + [(f"explicit L={L}", JFB(), L) for L in unrolls]


DEQ_FORWARD = dict(solver=deq.Anderson(m=5), tol=1e-4, max_iter=60, on_nonconvergence="ignore")


@dataclass
class _CostBench:
    """The transformer block, its input and target, and how to build one layer per method."""

    module: nn.Module
    x: Tensor
    target: Tensor
    device: torch.device

    @property
    def params(self) -> list[Tensor]:
        return list(self.module.parameters())

    @property
    def not_activations(self) -> set[int]:
        """Storages of the parameters and of ``x``: saved by every method, excluded from the activation bytes."""
        return {p.untyped_storage().data_ptr() for p in self.params} | {self.x.untyped_storage().data_ptr()}

    def layer(self, backward, unroll, f=None, **over) -> DEQLayer:
        layer = DEQLayer(self.module if f is None else f, backward=backward, **{**DEQ_FORWARD, **over})
        layer.unroll_steps = unroll
        return layer

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        self.x.grad = None

    def loss(self, z: Tensor) -> Tensor:
        return (z - self.target).pow(2).mean()


def _time_methods(bench: _CostBench, layers: dict[str, DEQLayer], out: dict[str, dict], repeats: int) -> None:
    """Median forward, backward and step times: one warm-up step each, then rounds with the methods interleaved."""
    for rnd in range(repeats + 1):
        for name, layer in layers.items():
            bench.zero_grad()
            _sync(bench.device)
            t0 = time.perf_counter()
            loss = bench.loss(layer(bench.x))
            _sync(bench.device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(bench.device)
            t2 = time.perf_counter()
            if rnd > 0:
                out[name]["fwd_s"].append(t1 - t0)
                out[name]["bwd_s"].append(t2 - t1)
                out[name]["step_s"].append(t2 - t0)
            out[name].update(_solve_figures(layer.last_result))
    for r in out.values():
        for key in ("fwd_s", "bwd_s", "step_s"):
            r[key] = statistics.median(r[key])


def _solve_figures(res) -> dict:
    figures = dict(fwd_nstep_mean=float(res.nstep.double().mean()),
                   fwd_converged_frac=float(res.converged.double().mean()))
    if res.backward is not None:
        figures.update(bwd_nstep_mean=float(res.backward.nstep.double().mean()),
                       bwd_converged_frac=float(res.backward.converged.double().mean()),
                       bwd_residual_max=float(res.backward.residual.max()))
    return figures


def _count_calls(bench: _CostBench, rows, out: dict[str, dict]) -> None:
    """Batched f-calls and VJPs through f, with a counting wrapper (untimed)."""
    for name, bw, L in rows:
        counter = Counting(bench.module)
        bench.zero_grad()
        bench.loss(bench.layer(bw, L, f=counter)(bench.x)).backward()
        out[name]["f_calls"] = counter.calls
        out[name]["vjps"] = counter.vjps


def _measure_memory(bench: _CostBench, rows, layers: dict[str, DEQLayer], out: dict[str, dict]) -> None:
    """Saved bytes of the forward and the step's peaks (untimed); for DEQs also against ``max_iter``."""
    cuda = bench.device.type == "cuda"
    for name, bw, L in rows:
        bench.zero_grad()
        with SavedTensors() as saved, LiveTensorPeak() as live:
            if cuda:
                torch.cuda.reset_peak_memory_stats(bench.device)
                base = torch.cuda.memory_allocated(bench.device)
            z = layers[name](bench.x)
            saved_total = saved.total()
            bench.loss(z).backward()
            del z
        out[name].update(saved_bytes=saved_total, saved_bytes_no_params=saved.total(exclude=bench.not_activations),
                         peak_saved_bytes=saved.peak, peak_live_bytes=live.peak)
        if cuda:
            out[name]["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(bench.device) - base
        if L is None:
            out[name]["saved_bytes_by_max_iter"] = _saved_by_max_iter(bench, bw)


def _saved_by_max_iter(bench: _CostBench, backward) -> dict[int, dict]:
    """Saved bytes with every iteration run (an unreachable tol) at two budgets: constant in ``max_iter``."""
    by_iter = {}
    for max_iter in (10, 100):
        probe = bench.layer(backward, None, tol=1e-30 if bench.x.dtype == torch.float64 else 1e-20, max_iter=max_iter)
        bench.zero_grad()
        with SavedTensors() as s:
            z = probe(bench.x)
        by_iter[max_iter] = dict(saved_bytes=s.total(), n_iter=probe.last_result.n_iter)
        del z
    return by_iter


def _one_f_graph(bench: _CostBench, z_star: Tensor) -> dict:
    """One plain call of f with grad, at z*: the unit "one f graph"."""
    bench.zero_grad()
    with SavedTensors() as one, LiveTensorPeak() as one_live:
        fz = bench.module(z_star, bench.x)
        one_graph_live = one_live.current  # the graph's tensors plus f(z*), all alive here
    del fz
    return dict(saved_bytes=one.total(), saved_bytes_no_params=one.total(exclude=bench.not_activations),
                live_bytes=one_graph_live)


def cost(*, d_model: int, seq: int, batch: int, input_scale: float, unrolls: list[int], repeats: int,
         device: torch.device, regime: str) -> dict:
    _, _, meta = problems.transformer_block(d_model=d_model, seq=seq, batch=batch)
    target = torch.randn(meta["x"].shape, generator=torch.Generator().manual_seed(7)).to(device)
    bench = _CostBench(meta["module"].to(device).train(), (meta["x"] * input_scale).to(device).requires_grad_(),
                       target, device)
    rows = _rows(unrolls)
    layers = {name: bench.layer(bw, L) for name, bw, L in rows}
    out = {name: dict(method=name, fwd_s=[], bwd_s=[], step_s=[]) for name, _, _ in rows}
    _time_methods(bench, layers, out, repeats)
    _count_calls(bench, rows, out)
    _measure_memory(bench, rows, layers, out)

    z_star = layers["Implicit"].last_result.z.detach().clone().requires_grad_()
    rho_j = spectral_radius(bench.module, z_star, bench.x.detach(), n_iter=50,
                            generator=torch.Generator(device=device).manual_seed(0))
    one_graph = _one_f_graph(bench, z_star)
    ref, l12 = out["Implicit"], out.get("explicit L=12")
    for r in out.values():
        r["bwd_vs_implicit"] = r["bwd_s"] / ref["bwd_s"]
        r["step_vs_implicit"] = r["step_s"] / ref["step_s"]
        if l12 is not None:
            r["saved_vs_L12"] = r["saved_bytes"] / l12["saved_bytes"]
            r["saved_no_params_vs_L12"] = r["saved_bytes_no_params"] / l12["saved_bytes_no_params"]
    return dict(regime=regime, setting=dict(d_model=d_model, seq=seq, batch=batch, heads=meta["n_heads"],
                                            input_scale=input_scale, forward=repr(DEQ_FORWARD),
                                            rho_J_at_z_star=float(rho_j.max()),
                                            device=str(device), threads=torch.get_num_threads(),
                                            repeats=repeats),
                one_f_graph=one_graph, rows=list(out.values()))


def print_cost(c: dict) -> None:
    s = c["setting"]
    one = c["one_f_graph"]
    print(f"(b) cost [{c['regime']}]: transformer block d_model {s['d_model']}, seq {s['seq']}, batch {s['batch']}, "
          f"input x{s['input_scale']:g}, {s['device']}, {s['threads']} thread(s), median of {s['repeats']}")
    print(f"    spectral radius of J at z* (power method, max over batch): {s['rho_J_at_z_star']:.3f}; forward "
          f"Anderson(m=5) tol 1e-4 max_iter 60; Implicit backward Anderson(m=5) tol 1e-6 max_iter 200")
    print(f"    one f graph (plain call of f at z* with grad): saved {one['saved_bytes'] / MiB:.2f} MiB "
          f"({one['saved_bytes_no_params'] / MiB:.2f} MiB without parameters and x); live "
          f"{one['live_bytes'] / MiB:.2f} MiB")
    head = (f"  {'method':14s} {'bwd ms':>8s} {'/Impl':>6s} {'step ms':>8s} {'/Impl':>6s} {'f-calls':>7s} "
            f"{'VJPs':>5s} {'fwd it':>6s} {'bwd it':>6s} {'bwd res':>8s} {'saved MiB':>9s} {'/L12':>6s} {'-params':>8s} {'/L12':>6s} "
            f"{'pk saved':>8s} {'pk live':>8s} {'mi10/100 MiB':>13s}")
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in c["rows"]:
        by = r.get("saved_bytes_by_max_iter")
        mi = (f"{by[10]['saved_bytes'] / MiB:.2f}/{by[100]['saved_bytes'] / MiB:.2f}" if by else "")
        print(f"  {r['method']:14s} {r['bwd_s'] * 1e3:8.1f} {r['bwd_vs_implicit']:6.2f} {r['step_s'] * 1e3:8.1f} "
              f"{r['step_vs_implicit']:6.2f} {r['f_calls']:7d} {r['vjps']:5d} {r['fwd_nstep_mean']:6.1f} "
              f"{r.get('bwd_nstep_mean', float('nan')):6.1f} {r.get('bwd_residual_max', float('nan')):8.1e} "
              f"{r['saved_bytes'] / MiB:9.2f} "
              f"{r.get('saved_vs_L12', float('nan')):6.1%} {r['saved_bytes_no_params'] / MiB:8.2f} "
              f"{r.get('saved_no_params_vs_L12', float('nan')):6.1%} {r['peak_saved_bytes'] / MiB:8.2f} "
              f"{r['peak_live_bytes'] / MiB:8.2f} {mi:>13s}")


# ----------------------------------------------------------------------------
# Targets

def targets(acc: dict, costs: list[dict]) -> list[dict]:
    steps = acc["setting"]["unroll"]
    out = [dict(target=f"Implicit cos-sim >= 0.9999 (exact Implicit vs {steps} unrolled steps, all parameters)",
                value=acc["implicit_exact_vs_unrolled"]["all"],
                met=acc["implicit_exact_vs_unrolled"]["all"] >= 0.9999),
           dict(target="Implicit at training tolerances (fwd 1e-4, bwd 1e-6) cos-sim >= 0.9999",
                value=acc["implicit_practical"]["cos"]["all"],
                met=acc["implicit_practical"]["cos"]["all"] >= 0.9999)]
    for c in costs:
        rows = {r["method"]: r for r in c["rows"]}
        tag = f"[{c['regime']}] "
        for m in ("UPG(5,0.5)", "NPG(5,0.5)"):
            speedup = 1 / rows[m]["bwd_vs_implicit"]
            out.append(dict(target=tag + f"{m} backward >= 1.7x faster than Implicit (bwd tol 1e-6)",
                            value=speedup, met=speedup >= 1.7))
        if "explicit L=12" in rows:
            for m in ("Implicit", "NPG(5,0.5)", "JFB"):
                for key, what in (("saved_vs_L12", "with parameters"),
                                  ("saved_no_params_vs_L12", "activations only")):
                    out.append(dict(target=tag + f"{m} saved bytes <= 12% of explicit L=12 ({what})",
                                    value=rows[m][key], met=rows[m][key] <= 0.12))
        for m in ("Implicit", "NPG(5,0.5)", "JFB", "UPG(5,0.5)"):
            by = rows[m]["saved_bytes_by_max_iter"]
            out.append(dict(target=tag + f"{m} saved bytes constant in max_iter (10 vs 100 iterations run)",
                            value=[by[10]["saved_bytes"], by[100]["saved_bytes"]],
                            met=(by[10]["saved_bytes"] == by[100]["saved_bytes"] and by[10]["n_iter"] == 10
                                 and by[100]["n_iter"] == 100)))
        one = c["one_f_graph"]
        imp, jfb = rows["Implicit"], rows["JFB"]
        for key, unit, what in (("peak_saved_bytes", one["saved_bytes"], "live saved tensors (the CPU metric)"),
                                ("peak_live_bytes", one["live_bytes"], "all live tensors (dispatch tracker)"),
                                ("cuda_peak_bytes", one["live_bytes"], "torch.cuda.max_memory_allocated")):
            if key not in imp:
                continue
            excess = imp[key] - jfb[key]
            out.append(dict(target=tag + f"Implicit step peak <= JFB's + one f graph, {what}",
                            value=dict(implicit_MiB=imp[key] / MiB, jfb_MiB=jfb[key] / MiB,
                                       excess_MiB=excess / MiB, one_f_graph_MiB=unit / MiB),
                            met=excess <= unit))
    return out


def print_targets(ts: list[dict]) -> None:
    print("targets:")
    for t in ts:
        v = t["value"]
        if isinstance(v, float):
            v = f"{v:.6g}"
        elif isinstance(v, dict):
            v = ", ".join(f"{k} {x:.2f}" for k, x in v.items())
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {v}")


# ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--out", default="bench_out", help="directory for gradients.json and the PNG")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 5; 2 quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (2 if args.quick else 5)

    if args.quick:
        acc = accuracy(width=16, batch=4, n_in=8, rho=0.9, input_scale=0.5, ks=[1, 2, 3], dampings=[0.5, 1.0],
                       unroll=400)
        sizes = dict(d_model=16, seq=8, batch=2, unrolls=[6, 12, 24])
        regimes = [("default init", 1.0)]
    else:
        acc = accuracy(width=256, batch=64, n_in=64, rho=0.9, input_scale=0.5, ks=list(range(1, 11)),
                       dampings=[0.5, 1.0], unroll=600)
        sizes = dict(d_model=128, seq=64, batch=8, unrolls=[6, 12, 24])
        regimes = [("default init", 1.0), ("hard: input x0.3", 0.3)]
    print_accuracy(acc)
    plot_accuracy(acc, out_dir / "gradients_cos_sim.png")
    print()
    costs = []
    for regime, scale in regimes:
        c = cost(**sizes, input_scale=scale, repeats=repeats, device=device, regime=regime)
        print_cost(c)
        print()
        costs.append(c)
    ts = targets(acc, costs)
    print_targets(ts)
    result = dict(benchmark="gradients", quick=args.quick, torch=torch.__version__, accuracy=acc, cost=costs,
                  targets=ts)
    (out_dir / "gradients.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out_dir / 'gradients.json'} and {out_dir / 'gradients_cos_sim.png'}")
    return result


if __name__ == "__main__":
    main()
