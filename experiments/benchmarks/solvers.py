"""Forward solvers on DEQ-like problems: f-calls, accuracy, wall time, solver overhead.

For every problem (tanh contractions of spectral radius 0.9/0.95/0.99, a
Transformer block, a TrellisNet gated convolution; see ``problems.py``), every
solver (fixed_point, anderson, broyden, broyden with line search) and tolerance
(1e-4, 1e-6, ``stop_mode="rel"``) it reports:

- ``nstep``: mean f-calls per sample (``SolverResult.nstep``), and ``calls``,
  the calls of f on the whole batch (the loop keeps converged samples in the
  batch, so ``calls >= max nstep``);
- ``res_max``: the largest final residual of the returned z, ``conv``: the
  fraction of samples converged;
- ``wall_ms``: median wall time of one ``deq.solve`` over the repeats;
- ``t_f_ms``: one call of f, measured separately: after each timed solve, the
  median of 10-100 calls of f at the solution (about 50 ms of calls); the
  column is the median over the repeats, the header the median of all calls;
- ``overhead = (wall - nstep * t_f) / wall``: the share of the wall time not
  explained by the f-calls the samples needed (it includes the calls made for
  samples that had already converged, and the loop's own tensor work), per
  repeat with the t_f timed right after that repeat, median over repeats;
- ``ovh_in``: ``(wall - time inside f) / wall`` from the same runs (a wrapper
  times each call of f): the loop's own share, insensitive to load drift
  between the f timing and the solves.

It also prints Broyden's state bytes for ``max_iter`` 30 and 300 (fixed-size
memory) and checks the targets (Anderson's f-calls against plain iteration,
the overhead bounds). CPU, one thread, float32.

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

from deq.solvers import Anderson, Broyden, FixedPoint, Solver, solve
from experiments.benchmarks import problems

TOLS = (1e-4, 1e-6)
SOLVERS = {
    "fixed_point": FixedPoint(),
    "anderson": Anderson(),
    "broyden": Broyden(),
    "broyden_ls": Broyden(line_search=True),
}
OVERHEAD_TARGET = {"tanh": 0.35, "transformer": 0.2, "trellis": 0.2}


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
        ("tanh", problems.tanh_contraction(width=256, batch=64, rho=0.9), 1000),
        ("tanh", problems.tanh_contraction(width=256, batch=64, rho=0.95), 1000),
        ("tanh", problems.tanh_contraction(width=256, batch=64, rho=0.99), 1000),
        # The same contraction with a larger batch: the loop's per-iteration
        # tensor ops cost about the same while f costs 4x as much.
        ("tanh", problems.tanh_contraction(width=256, batch=256, rho=0.9), 1000),
        ("transformer", problems.transformer_block(d_model=128, n_heads=4, seq=64, batch=8), 200),
        ("trellis", problems.trellis_conv(n_hidden=128, n_in=64, seq=64, batch=8), 200),
    ]


class TimedF:
    """Counts the calls of f and the time spent inside it."""

    def __init__(self, f):
        self.f, self.calls, self.seconds = f, 0, 0.0

    def __call__(self, z):
        start = time.perf_counter()
        out = self.f(z)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def time_f(f, z, n: int) -> list[float]:
    """n individually timed calls of f at z (no autograd)."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            start = time.perf_counter()
            f(z)
            out.append(time.perf_counter() - start)
    return out


def run_problem(kind: str, prob: tuple, max_iter: int, repeats: int) -> tuple[list[dict], dict]:
    f, z0, meta = prob
    reference = solve(f, z0, solver="anderson", tol=1e-6, max_iter=max_iter)
    z_star = reference.z
    f_samples = time_f(f, z_star, 20)  # warm-up and first samples
    # Calls of f timed after each solve: enough for a stable median, ~50 ms.
    per_repeat = int(min(100, max(10, 0.05 / statistics.median(f_samples))))
    rows = []
    for name, solver in SOLVERS.items():
        for tol in TOLS:
            solve(f, z0, solver=solver, tol=tol, max_iter=max_iter)  # warm-up
            walls, in_f, calls, t_fs, result = [], [], [], [], None
            for _ in range(repeats):
                timed = TimedF(f)
                start = time.perf_counter()
                result = solve(timed, z0, solver=solver, tol=tol, max_iter=max_iter)
                walls.append(time.perf_counter() - start)
                in_f.append(timed.seconds)
                calls.append(timed.calls)
                near = time_f(f, z_star, per_repeat)
                t_fs.append(statistics.median(near))
                f_samples += near
            nstep = result.nstep.double().mean().item()
            rows.append(dict(problem=meta["name"], kind=kind, solver=name, tol=tol, max_iter=max_iter,
                             nstep_mean=nstep, nstep_max=int(result.nstep.max()),
                             calls=calls[-1], n_iter=result.n_iter,
                             converged=result.converged.double().mean().item(),
                             res_max=result.residual.double().max().item(),
                             res_mean=result.residual.double().mean().item(),
                             wall_s=statistics.median(walls), walls_s=walls, t_f_s=statistics.median(t_fs),
                             t_f_per_repeat_s=t_fs, in_f_s=statistics.median(in_f),
                             # Each repeat's wall against the t_f timed right after it, so that a
                             # change of machine load between repeats does not leak into the ratio.
                             overhead=statistics.median((w - nstep * t) / w for w, t in zip(walls, t_fs)),
                             ovh_in=statistics.median((w - t) / w for w, t in zip(walls, in_f))))
    t_f = statistics.median(f_samples)
    info = {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}
    info.update(kind=kind, t_f_s=t_f, t_f_samples=len(f_samples), max_iter=max_iter)
    return rows, info


def state_bytes(solver: Solver, f, z0, max_iter: int) -> tuple[int, int]:
    """Largest bytes held by the solver's state tensors during one solve, and the steps taken."""

    class Spy(Solver):
        name = solver.name

        def __init__(self):
            self.peak, self.steps = 0, 0

        def _record(self, state):
            tensors = []
            for value in state.values():
                tensors += list(value) if isinstance(value, tuple) else [value]
            size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            self.peak = max(self.peak, size)

        def init(self, z, fz):
            state = solver.init(z, fz)
            self._record(state)
            return state

        def step(self, state, z, fz, active, evaluate):
            self.steps += 1
            state, z, fz = solver.step(state, z, fz, active, evaluate)
            self._record(state)
            return state, z, fz

    spy = Spy()
    # An unreachable tolerance, so that the solve runs all max_iter iterations.
    solve(f, z0, solver=spy, tol=1e-30, max_iter=max_iter, stop_mode="abs")
    return spy.peak, spy.steps


def print_table(rows: list[dict], info: dict) -> None:
    extra = ""
    if "rho_J" in info:
        extra = f", rho(J(z*)) = {info['rho_J']:.4f} (max over batch; W: {info['rho_W']})"
    print(f"\n{info['name']}: batch {info['batch']}, D = {info['dim']} per sample{extra}, "
          f"t_f = {info['t_f_s'] * 1e3:.3f} ms (median of {info['t_f_samples']}), max_iter {info['max_iter']}")
    head = (f"{'solver':<12} {'tol':>7} {'nstep':>8} {'calls':>6} {'conv':>5} {'res_max':>9} "
            f"{'wall_ms':>9} {'t_f_ms':>7} {'overhead':>8} {'ovh_in':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['solver']:<12} {r['tol']:>7.0e} {r['nstep_mean']:>8.1f} {r['calls']:>6d} {r['converged']:>5.2f} "
              f"{r['res_max']:>9.2e} {r['wall_s'] * 1e3:>9.2f} {r['t_f_s'] * 1e3:>7.3f} {r['overhead']:>8.2f} "
              f"{r['ovh_in']:>7.2f}")


def check_targets(all_rows: list[dict], infos: list[dict]) -> list[dict]:
    """The targets of the solver issue, each with the numbers that decide it."""
    checks = []
    by = {(r["problem"], r["solver"], r["tol"]): r for r in all_rows}
    for info in infos:
        name = info["name"]
        for tol in TOLS:
            fp, aa = by[(name, "fixed_point", tol)], by[(name, "anderson", tol)]
            ratio = fp["nstep_mean"] / aa["nstep_mean"]
            # Every problem here is a contraction at its fixed point (the plain iteration converges).
            checks.append(dict(target="fixed_point nstep / anderson nstep >= 1", problem=name, tol=tol,
                               value=round(ratio, 2), met=aa["nstep_mean"] <= fp["nstep_mean"]))
            if info["kind"] == "tanh":
                if info.get("rho_W") == 0.99:
                    checks.append(dict(target="fixed_point nstep / anderson nstep >= 3",
                                       problem=name, tol=tol, value=round(ratio, 2), met=ratio >= 3))
        bound = OVERHEAD_TARGET[info["kind"]]
        for r in all_rows:
            if r["problem"] == name:
                checks.append(dict(target=f"overhead <= {bound}", problem=name, tol=r["tol"], solver=r["solver"],
                                   value=round(r["overhead"], 3), ovh_in=round(r["ovh_in"], 3),
                                   met=r["overhead"] <= bound))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--out", default="bench_out", help="directory for solvers.json")
    parser.add_argument("--repeats", type=int, default=None, help="timed solves per cell (default 5, quick 1)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.time()
    load_before = os.getloadavg()

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
    print("\nTargets" + (" (quick mode: tiny sizes, so the numbers say nothing about the targets):"
                          if args.quick else " (values at tol 1e-4 / 1e-6):"))
    groups: dict[tuple, list[dict]] = {}
    for c in checks:
        groups.setdefault((c["target"], c["problem"], c.get("solver", "")), []).append(c)
    for (target, problem, solver), cs in groups.items():
        values = " / ".join(f"{c['value']:.2f}" for c in cs)
        if "ovh_in" in cs[0]:
            values += " (ovh_in " + " / ".join(f"{c['ovh_in']:.2f}" for c in cs) + ")"
        met = "met " if all(c["met"] for c in cs) else ("MISS" if not any(c["met"] for c in cs) else "part")
        print(f"  [{met}] {target:<46} {problem:<24} {solver:<11} {values}")
    same = memory[30]["state_bytes"] == memory[300]["state_bytes"]
    print(f"  [{'met ' if same else 'MISS'}] Broyden state bytes independent of max_iter "
          f"({memory[30]['state_bytes']} vs {memory[300]['state_bytes']})")

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
