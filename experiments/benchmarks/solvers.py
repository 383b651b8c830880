"""Forward solvers on DEQ-like problems: f-calls, rows processed, solver overhead, host syncs.

For every problem (tanh contractions of spectral radius 0.9/0.95/0.99, a
Transformer block, a TrellisNet gated convolution; see ``problems.py``), every
solver (fixed_point, anderson, broyden, broyden with line search) and tolerance
(1e-4, 1e-6, ``stop_mode="rel"``), once on the whole batch and once in
active-set mode (``compact=True``), it reports:

- ``nstep``: mean f-calls per sample (``SolverResult.nstep``), and ``iters``,
  the iterations of the loop (calls of f on the batch);
- ``rows``: the rows f processed (``SolverResult.rows``), against ``alone``,
  the rows the samples need when each is solved alone (the sum of ``nstep``:
  the tests check that a batch gives each sample's ``nstep``); the ratio is
  the physical limit's yardstick (1 is no waste);
- ``overhead = (wall - time inside f) / wall``, from the same timed solves
  (a wrapper times each call of f): the loop's and the solver's own share;
  median over the repeats; ``t_f`` the mean time of one call of f on the
  whole batch;
- ``wall c/f``: the wall time of the compact solve over that of the full one
  (same run, medians);
- ``syncs``: host syncs per solve (calls of ``item``/``tolist``/``bool``/``int``/
  ``float``/``nonzero`` on tensors, counted in one extra solve), with the
  default check every iteration and, ``ad syncs``/``ad its``, with
  ``check_every="adaptive"`` (the default on an accelerator): its syncs and
  iterations (the per-sample results are the same);
- ``ops/it``: tensor operations (ATen ops, views included) the loop and the
  solver dispatch per iteration outside f, counted with a dispatch mode in
  one extra solve: the overhead of small problems is mostly this count times
  the few microseconds one eager op costs, and unlike a time it is exact.

It also prints Broyden's state bytes for ``max_iter`` 30 and 300 (fixed-size
memory) and checks the targets. CPU, one thread, float32.

Usage::

    python experiments/benchmarks/solvers.py [--quick] [--out DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deq.layer import select_rows
from deq.solvers import Anderson, Broyden, FixedPoint, Solver, solve
from experiments.benchmarks import problems

TOLS = (1e-4, 1e-6)
SOLVERS = {
    "fixed_point": FixedPoint(),
    "anderson": Anderson(),
    "broyden": Broyden(),
    "broyden_ls": Broyden(line_search=True),
}
OVERHEAD_TARGET = {"tanh": 0.30, "transformer": 0.10, "trellis": 0.10}
ROWS_TARGET = 1.05


def build_problems(quick: bool) -> list[tuple[str, tuple, int]]:
    """(kind, (f, z0, meta), max_iter) per problem."""
    if quick:
        return [
            ("tanh", problems.tanh_contraction(width=32, batch=8, rho=0.9), 400),
            ("tanh", problems.tanh_contraction(width=32, batch=8, rho=0.99), 1000),
            ("transformer", problems.transformer_block(d_model=16, n_heads=2, seq=8, batch=2), 100),
            ("trellis", problems.trellis_conv(n_hidden=8, n_in=4, seq=8, batch=2), 100),
        ]
    return [
        ("tanh", problems.tanh_contraction(width=256, batch=64, rho=0.9), 2000),
        ("tanh", problems.tanh_contraction(width=256, batch=64, rho=0.95), 2000),
        ("tanh", problems.tanh_contraction(width=256, batch=64, rho=0.99), 2000),
        ("transformer", problems.transformer_block(d_model=128, n_heads=4, seq=64, batch=8), 200),
        ("trellis", problems.trellis_conv(n_hidden=128, n_in=64, seq=64, batch=8), 200),
    ]


class TimedF:
    """f in the active-set form ``f(z, rows)``: times each call, slices the input once per working set."""

    def __init__(self, meta: dict):
        self.module, self.x = meta["module"], meta["x"]
        self.seconds, self.calls, self._rows = 0.0, 0, None

    def __call__(self, z, rows=None):
        start = time.perf_counter()
        if rows is None:
            x = self.x
        else:
            if self._rows is None or self._rows[0] is not rows:
                self._rows = (rows, select_rows(self.x, rows))
            x = self._rows[1]
        out = self.module(z, x)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


class SyncCounter:
    """Counts host syncs: Python-level calls that read a tensor's values on the host."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")

    def __enter__(self) -> "SyncCounter":
        self.count, self._saved = 0, {}
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)
            self._saved[name] = real

            def counted(tensor, *args, _real=real, **kwargs):
                self.count += 1
                return _real(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched outside f (f's own ops are not counted)."""

    def __init__(self):
        super().__init__()
        self.count, self.in_f = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_f:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, f):
        def counted(*args):
            self.in_f += 1
            try:
                return f(*args)
            finally:
                self.in_f -= 1
        return counted


def run_cell(meta: dict, z0, solver: Solver, tol: float, max_iter: int, compact: bool, repeats: int) -> dict:
    """Timed solves of one (problem, solver, tol, mode): medians, counts and the result's figures."""
    f = TimedF(meta)
    options = dict(solver=solver, tol=tol, max_iter=max_iter, compact=compact)
    solve(f if compact else (lambda z: f(z)), z0, **options)  # warm-up
    walls, inside, result = [], [], None
    for _ in range(repeats):
        f = TimedF(meta)
        start = time.perf_counter()
        result = solve(f if compact else (lambda z: f(z)), z0, **options)
        walls.append(time.perf_counter() - start)
        inside.append(f.seconds)
    per_call = inside[-1] / f.calls
    with SyncCounter() as syncs:
        solve(f if compact else (lambda z: f(z)), z0, **options)
    with SyncCounter() as adaptive_syncs:
        adaptive = solve(f if compact else (lambda z: f(z)), z0, check_every="adaptive", **options)
    ops = OpCounter()
    with ops:
        counted = solve(ops.wrap(f) if compact else ops.wrap(lambda z: f(z)), z0, **options)
    alone = int(result.nstep.sum())
    return dict(nstep_mean=result.nstep.double().mean().item(), nstep_max=int(result.nstep.max()),
                iters=result.n_iter, rows=result.rows, alone=alone, ratio=result.rows / alone,
                converged=result.converged.double().mean().item(), res_max=result.residual.double().max().item(),
                wall_s=statistics.median(walls), walls_s=walls, in_f_s=statistics.median(inside),
                t_call_s=per_call, syncs=syncs.count, ops_per_iter=ops.count / counted.n_iter,
                adaptive_syncs=adaptive_syncs.count, adaptive_iters=adaptive.n_iter,
                overhead=statistics.median((w - t) / w for w, t in zip(walls, inside)))


def run_problem(kind: str, prob: tuple, max_iter: int, repeats: int) -> tuple[list[dict], dict]:
    f, z0, meta = prob
    batch_call = TimedF(meta)
    with torch.no_grad():
        for _ in range(20):
            batch_call(z0)
    rows = []
    for name, solver in SOLVERS.items():
        for tol in TOLS:
            cells = {mode: run_cell(meta, z0, solver, tol, max_iter, mode == "compact", repeats)
                     for mode in ("full", "compact")}
            full, comp = cells["full"], cells["compact"]
            rows.append(dict(problem=meta["name"], kind=kind, solver=name, tol=tol, max_iter=max_iter, full=full,
                             compact=comp, wall_ratio=comp["wall_s"] / full["wall_s"]))
    info = {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}
    info.update(kind=kind, t_f_s=batch_call.seconds / batch_call.calls, max_iter=max_iter)
    return rows, info


def state_bytes(solver: Solver, f, z0, max_iter: int) -> tuple[int, int]:
    """Largest bytes held by the solver's state tensors during one solve, and the steps taken."""

    def tensors(state) -> list[torch.Tensor]:
        import dataclasses

        if isinstance(state, torch.Tensor):
            return [state]
        if isinstance(state, (tuple, list)):
            return [t for v in state for t in tensors(v)]
        if dataclasses.is_dataclass(state):
            return [t for fld in dataclasses.fields(state) if fld.init for t in tensors(getattr(state, fld.name))]
        return []

    class Spy(Solver):
        name = solver.name

        def __init__(self):
            self.peak, self.steps = 0, 0

        def _record(self, state):
            self.peak = max(self.peak, sum(t.numel() * t.element_size() for t in tensors(state)))

        def init(self, it):
            state = solver.init(it)
            self._record(state)
            return state

        def step(self, state, it, active, evaluate):
            self.steps += 1
            out = solver.step(state, it, active, evaluate)
            self._record(out[0])
            return out

    spy = Spy()
    # An unreachable tolerance, so that the solve runs all max_iter iterations.
    solve(f, z0, solver=spy, tol=1e-30, max_iter=max_iter, stop_mode="abs")
    return spy.peak, spy.steps


def print_table(rows: list[dict], info: dict) -> None:
    extra = f", rho(J(z*)) = {info['rho_J']:.4f} (max over batch; W: {info['rho_W']})" if "rho_J" in info else ""
    print(f"\n{info['name']}: batch {info['batch']}, D = {info['dim']} per sample{extra}, "
          f"t_f = {info['t_f_s'] * 1e3:.3f} ms per call on the batch, max_iter {info['max_iter']}")
    head = (f"{'solver':<11} {'tol':>6} {'nstep':>7} {'iters':>6} {'alone':>7} {'rows full':>9} {'ratio':>6} "
            f"{'rows cmp':>8} {'ratio':>6} {'ovh full':>8} {'ovh cmp':>7} {'wall c/f':>8} {'syncs':>5} {'ad syncs':>8} "
            f"{'ad its':>6} {'ops/it':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        full, comp = r["full"], r["compact"]
        print(f"{r['solver']:<11} {r['tol']:>6.0e} {full['nstep_mean']:>7.1f} {full['iters']:>6d} "
              f"{full['alone']:>7d} {full['rows']:>9d} {full['ratio']:>6.3f} {comp['rows']:>8d} {comp['ratio']:>6.3f} "
              f"{full['overhead']:>8.2f} {comp['overhead']:>7.2f} {r['wall_ratio']:>8.2f} {full['syncs']:>5d} "
              f"{full['adaptive_syncs']:>8d} {full['adaptive_iters']:>6d} {full['ops_per_iter']:>6.1f}")


def check_targets(all_rows: list[dict], infos: list[dict]) -> list[dict]:
    """The targets of the solver issues, each with the numbers that decide it."""
    checks = []
    by = {(r["problem"], r["solver"], r["tol"]): r for r in all_rows}
    for info in infos:
        name = info["name"]
        for tol in TOLS:
            fp, aa = by[(name, "fixed_point", tol)]["full"], by[(name, "anderson", tol)]["full"]
            ratio = fp["nstep_mean"] / aa["nstep_mean"]
            checks.append(dict(target="fixed_point nstep / anderson nstep >= 1", problem=name, tol=tol,
                               value=round(ratio, 2), met=aa["nstep_mean"] <= fp["nstep_mean"]))
            if info["kind"] == "tanh" and info.get("rho_W") == 0.99:
                checks.append(dict(target="fixed_point nstep / anderson nstep >= 3", problem=name, tol=tol,
                                   value=round(ratio, 2), met=ratio >= 3))
        bound = OVERHEAD_TARGET[info["kind"]]
        for r in all_rows:
            if r["problem"] != name:
                continue
            checks.append(dict(target=f"rows compact / alone <= {ROWS_TARGET}", problem=name, tol=r["tol"],
                               solver=r["solver"], value=round(r["compact"]["ratio"], 3),
                               met=r["compact"]["ratio"] <= ROWS_TARGET))
            checks.append(dict(target=f"overhead (full) <= {bound}", problem=name, tol=r["tol"], solver=r["solver"],
                               value=round(r["full"]["overhead"], 3), met=r["full"]["overhead"] <= bound))
    return checks


def print_targets(checks: list[dict], memory: dict, quick: bool) -> None:
    print("\nTargets" + (" (quick mode: tiny sizes, so the numbers say nothing about the targets):"
                          if quick else " (values at tol 1e-4 / 1e-6):"))
    groups: dict[tuple, list[dict]] = {}
    for c in checks:
        groups.setdefault((c["target"], c["problem"], c.get("solver", "")), []).append(c)
    for (target, problem, solver), cs in groups.items():
        values = " / ".join(f"{c['value']:.3g}" for c in cs)
        met = "met " if all(c["met"] for c in cs) else ("MISS" if not any(c["met"] for c in cs) else "part")
        print(f"  [{met}] {target:<40} {problem:<24} {solver:<11} {values}")
    same = memory[30]["state_bytes"] == memory[300]["state_bytes"]
    print(f"  [{'met ' if same else 'MISS'}] Broyden state bytes independent of max_iter "
          f"({memory[30]['state_bytes']} vs {memory[300]['state_bytes']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--out", default="bench_out", help="directory for solvers.json")
    parser.add_argument("--repeats", type=int, default=None, help="timed solves per cell (default 5, quick 1)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started, load_before = time.time(), os.getloadavg()

    all_rows, infos = [], []
    for kind, prob, max_iter in build_problems(args.quick):
        rows, info = run_problem(kind, prob, max_iter, repeats)
        print_table(rows, info)
        all_rows += rows
        infos.append(info)

    # Broyden's working memory does not depend on max_iter.
    f, z0, meta = problems.tanh_contraction(width=32 if args.quick else 256, batch=8 if args.quick else 64,
                                            rho=0.99)
    memory = {}
    for max_iter in (30, 300):
        peak, steps = state_bytes(Broyden(), f, z0, max_iter)
        memory[max_iter] = dict(state_bytes=peak, steps=steps)
    print(f"\nBroyden(memory=20) state on {meta['name']} (batch {meta['batch']}, D {meta['dim']}, float32): "
          + ", ".join(f"max_iter={k}: {v['state_bytes']} bytes after {v['steps']} steps" for k, v in memory.items()))
    checks = check_targets(all_rows, infos)
    print_targets(checks, memory, args.quick)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(
        benchmark="solvers", quick=args.quick, repeats=repeats, tols=TOLS, stop_mode="rel", dtype="float32",
        solvers={k: repr(v) for k, v in SOLVERS.items()},
        env=dict(torch=torch.__version__, threads=torch.get_num_threads(), python=platform.python_version(),
                 machine=platform.machine(), processor=platform.processor(), cpus=os.cpu_count(),
                 load_before=load_before, load_after=os.getloadavg(), seconds=time.time() - started),
        problems=infos, rows=all_rows, broyden_state_bytes=memory, targets=checks)
    (out / "solvers.json").write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out / 'solvers.json'} ({time.time() - started:.0f} s; load average before "
          f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
