"""Causal mode against the plain per-sample solve: f-calls, overhead, and the leak it removes.

For the two language models' equilibrium functions (the DEQ-Transformer block
with relative attention over [memory ; segment], the DEQ-TrellisNet cell),
built as :class:`deq.models.DEQTransformerLM` / :class:`deq.models.DEQTrellisNetLM`
at their initialisation (seeded), and for the solver benchmark's causal
Transformer block (``problems.transformer_block``: post-LN, converges in
10-30 iterations at its init, where the language model's block at
``init_std`` 0.02 needs 100-200), and every solver (fixed_point, anderson,
broyden) at ``tol`` 1e-3 and 1e-6 (``stop_mode="rel"``, ``max_iter`` 200), it
reports for the plain solve and for the causal mode (``time_dim``):

- ``nstep``: mean f-calls per sample, ``conv``: the fraction converged;
- ``ovh``: ``(wall - time inside f) / wall`` (a wrapper times each call of
  f), the median of the repeats, and the causal / plain wall-time ratio;
- the leak: with the recipe budget (rel 1e-3, at most 30 iterations, eval
  mode), the largest change of any log-probability at positions ``< p`` when
  the tokens at positions ``>= p`` are replaced, over a few ``p``, in each mode.
  It is exactly 0 in causal mode; without it the solver's per-sequence
  mixing and stopping let later tokens move earlier predictions.

``--run DIR`` evaluates a trained run of ``experiments/train.py`` on a corpus
instead: the validation perplexity of the same weights in both modes (the
run's eval budget), and the leak at that budget on validation text. CPU, one
thread, float32.

Usage::

    python experiments/benchmarks/causal.py [--quick] [--out DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

import deq
from deq.models import DEQTransformerLM, DEQTrellisNetLM
from deq.models.weight_norm import cached_weights
from experiments.benchmarks import problems

TOLS = (1e-3, 1e-6)
SOLVERS = ("fixed_point", "anderson", "broyden")
F_CALLS_TARGET = 1.10  # causal Anderson's f-calls within 10% of the plain Anderson's


def build_models(quick: bool) -> dict[str, torch.nn.Module]:
    """The two families at a CPU size (tiny with --quick), eval mode, no dropout."""
    layer = functools.partial(deq.DEQLayer, on_nonconvergence="ignore")
    torch.manual_seed(0)
    size = dict(d_model=32, n_head=2, d_head=16, d_inner=64) if quick else dict(d_model=128, n_head=4, d_head=32,
                                                                                 d_inner=512)
    transformer = DEQTransformerLM(n_token=200, mem_len=16 if quick else 64, init_std=0.02, deq_layer=layer,
                                   **size)
    torch.manual_seed(0)
    trellis = DEQTrellisNetLM(ntoken=200, ninp=16 if quick else 64, nhid=16 if quick else 128,
                              nout=16 if quick else 64, deq_layer=layer)
    return {"transformer": transformer.eval(), "trellisnet": trellis.eval()}


def tokens(batch: int, length: int, seed: int, n_token: int = 200) -> torch.Tensor:
    return torch.randint(0, n_token, (batch, length), generator=torch.Generator().manual_seed(seed))


class Captured:
    """The model's equilibrium problem for one segment: f bound to its input, z0, time_dim."""

    def __init__(self, model: torch.nn.Module, input: torch.Tensor, mems=None):
        self.model, self.calls = model, []
        layer = model.deq
        real = layer.forward

        def capture(x, z0=None, **kwargs):
            self.x, self.z0 = x, z0
            return real(x, z0, **kwargs)

        layer.forward = capture
        try:
            with torch.no_grad():
                model(input, mems=mems)
        finally:
            layer.forward = real
        self.f = layer.f
        self.time_dim = 1 if isinstance(model, DEQTransformerLM) else 2

    def solve(self, solver: str, tol: float, causal: bool, timed: list[float] | None = None):
        def f(z):
            start = time.perf_counter()
            out = self.f(z, self.x)
            if timed is not None:
                timed[0] += time.perf_counter() - start
            return out

        with torch.no_grad(), cached_weights(self.model):
            return deq.solve(f, self.z0, solver=solver, tol=tol, max_iter=200,
                             time_dim=self.time_dim if causal else None)


class Plain:
    """A ``problems.py`` problem in the form :func:`cost_rows` takes."""

    def __init__(self, problem):
        self.f, self.z0, _ = problem

    def solve(self, solver: str, tol: float, causal: bool, timed: list[float] | None = None):
        def f(z):
            start = time.perf_counter()
            out = self.f(z)
            if timed is not None:
                timed[0] += time.perf_counter() - start
            return out

        with torch.no_grad():
            return deq.solve(f, self.z0, solver=solver, tol=tol, max_iter=200, time_dim=1 if causal else None)


def cost_rows(name: str, problem, repeats: int) -> list[dict]:
    rows = []
    for solver in SOLVERS:
        for tol in TOLS:
            cells = {}
            for causal in (False, True):
                problem.solve(solver, tol, causal)  # warm-up
                walls, ovh, res = [], [], None
                for _ in range(repeats):
                    inside = [0.0]
                    start = time.perf_counter()
                    res = problem.solve(solver, tol, causal, inside)
                    wall = time.perf_counter() - start
                    walls.append(wall)
                    ovh.append((wall - inside[0]) / wall)
                cells[causal] = dict(nstep=res.nstep.double().mean().item(),
                                     converged=res.converged.double().mean().item(),
                                     wall_s=statistics.median(walls), overhead=statistics.median(ovh))
            rows.append(dict(model=name, solver=solver, tol=tol, plain=cells[False], causal=cells[True],
                             calls_ratio=cells[True]["nstep"] / cells[False]["nstep"],
                             wall_ratio=cells[True]["wall_s"] / cells[False]["wall_s"]))
    return rows


def set_causal(model, causal: bool) -> None:
    model.deq.time_dim = (1 if isinstance(model, DEQTransformerLM) else 2) if causal else None


def leak(model, batch: int, length: int, seed: int, *, solver: str = "anderson", max_iter: int = 30) -> dict:
    """Largest change of log-probabilities before position p when random tokens replace those from p on."""
    vocab = model_vocab(model)
    return leak_on(model, tokens(batch, length, seed, vocab), tokens(batch, length, seed + 1, vocab), solver=solver,
                   tol=1e-3, max_iter=max_iter)


def trained(run_dir: str) -> dict:
    """Perplexity of a trained run's validation split in both modes, and the leak on its text."""
    from experiments.config import build
    from experiments.distributed import DistInfo
    from experiments.evaluation import evaluate
    from experiments.generate import load_run

    model, _, cfg = load_run(run_dir)
    task = build(cfg.data)
    out = {"run": run_dir, "step": None, "modes": {}}
    for causal in (False, True):
        set_causal(model, causal)
        started = time.perf_counter()
        metrics = evaluate(model, task, "valid", precision="fp32", info=DistInfo(), device=torch.device("cpu"),
                           mem_len=cfg.train.eval_mem_len).metrics
        out["modes"]["causal" if causal else "plain"] = dict(ppl=metrics["ppl"], fwd_nstep=metrics["fwd_nstep"],
                                                             fwd_residual=metrics["fwd_residual"],
                                                             seconds=time.perf_counter() - started)
    x = next(iter(task.eval_batches("valid")))[0]
    layer = model.deq
    out["leak"] = leak_on(model, x, x.flip(0), solver=layer.solver, tol=layer.eval_tol, max_iter=layer.eval_max_iter)
    out["budget"] = dict(solver=repr(layer.solver), tol=layer.eval_tol, max_iter=layer.eval_max_iter)
    return out


def leak_on(model, x: torch.Tensor, other: torch.Tensor, *, solver, tol: float, max_iter: int) -> dict:
    """Largest change of a log-probability before position p when ``other``'s tokens replace ``x``'s from p on.

    Over p at a quarter, half and three quarters of the length, in each mode, at the given eval budget.
    """
    layer = model.deq
    saved = (layer.solver, layer.eval_tol, layer.eval_max_iter, layer.time_dim)
    layer.solver, layer.eval_tol, layer.eval_max_iter = deq.get_solver(solver), tol, max_iter
    out, length = {}, x.shape[1]
    try:
        for causal in (False, True):
            set_causal(model, causal)
            with torch.no_grad():
                base = model(x).logits
                worst = 0.0
                for p in (length // 4, length // 2, 3 * length // 4):
                    edited = x.clone()
                    edited[:, p:] = other[:, p:]
                    worst = max(worst, float((model(edited).logits[:, :p] - base[:, :p]).abs().max()))
            out["causal" if causal else "plain"] = worst
    finally:
        layer.solver, layer.eval_tol, layer.eval_max_iter = saved[:3]
        layer.time_dim = saved[3]
    return out


def model_vocab(model) -> int:
    return model.n_token if isinstance(model, DEQTransformerLM) else model.ntoken


def print_rows(rows: list[dict]) -> None:
    head = (f"{'model':<12} {'solver':<12} {'tol':>6} {'nstep':>7} {'causal':>7} {'ratio':>6} {'conv':>9} "
            f"{'ovh':>5} {'ovh c':>6} {'wall c/p':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        p, c = r["plain"], r["causal"]
        print(f"{r['model']:<12} {r['solver']:<12} {r['tol']:>6.0e} {p['nstep']:>7.1f} {c['nstep']:>7.1f} "
              f"{r['calls_ratio']:>6.3f} {p['converged']:>4.2f}/{c['converged']:<4.2f} {p['overhead']:>5.2f} "
              f"{c['overhead']:>6.2f} {r['wall_ratio']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--out", default="bench_out", help="directory for causal.json")
    parser.add_argument("--repeats", type=int, default=None, help="timed solves per cell (default 3, quick 1)")
    parser.add_argument("--run", default=None, help="a trained run's directory: perplexity and leak of its weights")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(1)
    started = time.time()
    if args.run is not None:
        report = trained(args.run)
        print(f"{args.run}: validation, the run's eval budget {report['budget']}")
        for mode, m in report["modes"].items():
            print(f"  {mode:<7} ppl {m['ppl']:.2f}   forward {m['fwd_nstep']:.1f} iterations, residual "
                  f"{m['fwd_residual']:.2e}   {m['seconds']:.0f} s")
        print(f"  leak (largest |change| of an earlier log-probability when later tokens change): "
              f"plain {report['leak']['plain']:.3g}, causal {report['leak']['causal']:.3g}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "causal_run.json").write_text(json.dumps(report, indent=1, default=str))
        return
    batch, length = (2, 12) if args.quick else (8, 64)
    rows, leaks = [], {}
    for name, model in build_models(args.quick).items():
        rows += cost_rows(name, Captured(model, tokens(batch, length, seed=1)), repeats)
        leaks[name] = leak(model, batch, length, seed=3)
    block = problems.transformer_block(d_model=16 if args.quick else 128, n_heads=2 if args.quick else 4, seq=length,
                                       batch=batch)
    rows += cost_rows("bench block", Plain(block), repeats)
    print(f"f-calls and overhead, plain vs causal (batch {batch}, {length} tokens, max_iter 200, at init):")
    print_rows(rows)
    print("\nleak: largest |change| of an earlier log-probability when later tokens are edited "
          "(anderson, rel 1e-3, <= 30 iterations, eval):")
    for name, value in leaks.items():
        print(f"  {name:<12} plain {value['plain']:.3g}   causal {value['causal']:.3g}")
    checks = []
    for r in rows:
        if r["solver"] == "anderson":
            checks.append(dict(target=f"causal anderson f-calls <= {F_CALLS_TARGET} x plain", model=r["model"],
                               tol=r["tol"], value=round(r["calls_ratio"], 3),
                               met=r["calls_ratio"] <= F_CALLS_TARGET))
    for name, value in leaks.items():
        checks.append(dict(target="causal leak == 0", model=name, value=value["causal"], met=value["causal"] == 0))
    print("\nTargets" + (" (quick: tiny sizes):" if args.quick else ":"))
    for c in checks:
        print(f"  [{'met ' if c['met'] else 'MISS'}] {c['target']:<42} {c['model']:<12} {c.get('tol', ''):>6} "
              f"{c['value']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "causal.json").write_text(json.dumps(dict(benchmark="causal", quick=args.quick, rows=rows, leaks=leaks,
                                                     targets=checks, seconds=time.time() - started), indent=1))
    print(f"\nwrote {out / 'causal.json'} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
