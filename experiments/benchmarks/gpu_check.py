"""A CUDA check of deq in one run: memory, speed, bf16 training, host syncs, sync schedule.

Five sections, each printed as a table, all written to ``gpu_check.json`` in ``--out``:

1. **memory** under the DEQ paper's protocol (``memory.py --protocol``): batch
   15, length 150, word embeddings excluded; each DEQ against its explicit twin
   (18-layer Transformer, 70- and 60-layer TrellisNets): counted saved bytes
   and, on CUDA, ``torch.cuda.max_memory_allocated`` of a training step.
2. **speed** of the WikiText-103 medium DEQ-Transformer
   (``TRANSFORMER_PRESETS["wt103_medium"]``) on synthetic tokens at the
   recipe's batch 56 and length 150 (halved until it fits): training steps/s
   (forward, backward, clipping, Adam), tokens/s and peak memory, in DEQ mode
   with Implicit (Broyden, the recipe's backward), UPG(5, 0.8) and NPG(5, 0.8),
   and for the 18-layer explicit twin, under bf16 autocast and in fp32; the
   DEQ/explicit time per token next to the paper's 2.82x.
3. **training**: a small DEQ-Transformer trained in bf16 autocast on a
   synthetic Markov-chain corpus (4 likely successors per token: the best
   achievable perplexity is about 3.6); the train perplexity must fall.
4. **host syncs** per solver iteration: ops that make the host wait for the
   device (``aten._local_scalar_dense``, ``aten.nonzero``, boolean indexing,
   device-to-host copies, ...) counted exactly with a ``TorchDispatchMode``
   during a forward solve and a backward solve of each solver; on CUDA also
   the synchronisations ``torch.cuda.set_sync_debug_mode("warn")`` reports.
5. **checks**: the forward solve time of a DEQ-Transformer block at the
   WikiText-103 recipe's width and batch (d_model 700, d_inner 48000, batch
   56 x 150) with a host sync every iteration and with ``check_every="auto"``
   (the adaptive schedule on an accelerator), with their syncs.

A row that fails (out of memory at every batch, or an op that does not yet run
under autocast) is reported with its error and the run goes on.

Run on one H100/H200 (about 3-5 minutes, nothing downloaded, no hydra), from the
repository root with the project installed (``pip install --no-deps -e .`` is enough)
or with ``python -m experiments.benchmarks.gpu_check`` in place of the path::

    python experiments/benchmarks/gpu_check.py --device cuda --out bench_out

CPU smoke run at toy sizes (seconds; CI-sized)::

    python experiments/benchmarks/gpu_check.py --quick --out bench_out
"""

from __future__ import annotations

import argparse
import statistics
import functools
import gc
import json
import math
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import deq
from deq.models.transformer import TRANSFORMER_PRESETS, DEQTransformerLM
from experiments.benchmarks import memory  # the memory protocol

GiB = 2 ** 30
PAPER_TIME_RATIO = 2.82  # Bai et al. 2019: DEQ-Transformer (medium) / 18-layer Transformer-XL training time


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _error(exc: BaseException) -> str:
    line = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return line[:200]


def _deq_layer(*, max_iter: int, backward=None):
    return functools.partial(deq.DEQLayer, solver=deq.Anderson(m=5), tol=1e-3, max_iter=max_iter, stop_mode="rel",
                             on_nonconvergence="ignore", fix_rng=False,
                             **({} if backward is None else {"backward": backward}))


# ----------------------------------------------------------------------------- 1. memory

def memory_section(device: torch.device, *, quick: bool) -> list[dict]:
    rows = []
    batch, seq = (2, 10) if quick else (memory.PROTOCOL_BATCH, memory.PROTOCOL_SEQ)
    for name, spec in memory._protocol_families(quick=quick).items():
        try:
            rows += memory.measure_protocol(name, spec, device=device, batch=batch, seq=seq)
        except Exception as exc:  # an out-of-memory family is reported, not fatal
            rows.append(dict(family=name, error=_error(exc)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    good = [r for r in rows if "error" not in r]
    print(f"\n== 1. memory, the paper's protocol (batch {batch}, length {seq}, word embeddings excluded) ==")
    if good:
        memory.print_protocol_table(good)
    for r in rows:
        if "error" in r:
            print(f"{r['family']}: FAILED {r['error']}")
    return rows


# ----------------------------------------------------------------------------- 2. speed

def _speed_config(quick: bool) -> tuple[dict, int, int, int]:
    """(model kwargs, batch, length, timed steps)."""
    if quick:
        kw = dict(TRANSFORMER_PRESETS["wt103_medium"], n_token=500, d_model=32, n_head=2, d_head=16, d_inner=64,
                  mem_len=8, cutoffs=[100, 200], div_val=2, tie_projs=[False, True, True])
        return kw, 4, 8, 1
    # The recipe (configs/experiment/wt103_transformer.yaml): batch 56, tgt_len 150, mem_len 150.
    return TRANSFORMER_PRESETS["wt103_medium"], 56, 150, 3


def _methods(twin: int) -> list[tuple[str, object, int | None]]:
    # Implicit as in the WT103 recipe (configs/grad/implicit_broyden35.yaml); the phantom
    # gradients as in wt103_transformer_upg (UPG(5, 0.8)) with NPG at the same k and damping.
    return [("Implicit(broyden)", deq.Implicit(solver=deq.Broyden(memory=35), tol=1e-3, max_iter=35), None),
            ("UPG(5,0.8)", deq.UPG(k=5, damping=0.8), None),
            ("NPG(5,0.8)", deq.NPG(k=5, damping=0.8), None),
            (f"explicit L={twin}", None, twin)]


def _time_steps(model, opt, tokens, *, batch: int, seq: int, steps: int, precision: str,
                device: torch.device) -> dict:
    """Warm-up step, then ``steps`` timed training steps carrying the memory; peak memory of the timed ones."""
    mems = None

    def step(i):
        nonlocal mems
        seg = tokens[:batch, i * seq:(i + 1) * seq + 1]
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            out = model(seg[:, :-1], seg[:, 1:], mems=mems)
        out.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        mems = out.mems
        return out.loss.detach()

    step(0)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        loss = step(i)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(batch=batch, step_s=seconds, steps_per_s=1.0 / seconds, tokens_per_s=batch * seq / seconds,
                peak_bytes=peak, loss=loss.item())


def _run_speed_row(model, opt, tokens, *, batch: int, seq: int, steps: int, precision: str,
                   device: torch.device) -> dict:
    """The largest batch from ``batch`` down (halving) that fits in memory."""
    while True:
        try:
            return _time_steps(model, opt, tokens, batch=batch, seq=seq, steps=steps, precision=precision,
                               device=device)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # Outside the except block: the exception's frames (and the tensors they hold) are gone.
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2


def speed_section(device: torch.device, *, quick: bool) -> list[dict]:
    kw, batch, seq, steps = _speed_config(quick)
    torch.manual_seed(0)
    model = DEQTransformerLM(**kw, deq_layer=_deq_layer(max_iter=30)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2.5e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, kw["n_token"], (batch, (steps + 1) * seq + 1), generator=gen).to(device)
    rows = []
    for precision in ("bf16", "fp32"):
        for label, backward, unroll in _methods(twin=18):
            model.deq.unroll_steps = unroll
            if backward is not None:
                model.deq.backward = backward
            row = dict(method=label, precision=precision)
            try:
                row.update(_run_speed_row(model, opt, tokens, batch=batch, seq=seq, steps=steps,
                                          precision=precision, device=device))
            except Exception as exc:
                row["error"] = _error(exc)
            if unroll is None and "error" not in row:
                res = model.deq.last_result
                row["fwd_nstep"] = float(res.nstep.double().mean())
                row["bwd_nstep"] = float(res.backward.nstep.double().mean()) if res.backward is not None else None
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _speed_ratios(rows)
    _print_speed(rows, kw, seq)
    return rows


def _speed_ratios(rows: list[dict]) -> None:
    for r in rows:
        twin = next((t for t in rows if t["precision"] == r["precision"] and t["method"].startswith("explicit")
                     and "error" not in t), None)
        ok = "error" not in r and twin is not None
        # Time per token, so rows that had to run a smaller batch still compare.
        r["time_vs_explicit"] = twin["tokens_per_s"] / r["tokens_per_s"] if ok else None


def _print_speed(rows: list[dict], kw: dict, seq: int) -> None:
    print(f"\n== 2. speed: DEQ-Transformer d_model={kw['d_model']} d_inner={kw['d_inner']} vocab={kw['n_token']}, "
          f"length {seq}, memory {kw['mem_len']} ==")
    head = (f"{'precision':9s} {'method':18s} {'batch':>5s} {'steps/s':>8s} {'tokens/s':>10s} {'peak GiB':>9s} "
            f"{'fwd f':>6s} {'bwd it':>6s} {'time/token vs explicit':>23s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['precision']:9s} {r['method']:18s} FAILED {r['error']}")
            continue
        peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GiB:9.2f}"
        ratio = "" if r["time_vs_explicit"] is None else f"{r['time_vs_explicit']:.2f}x"
        fwd = f"{r['fwd_nstep']:6.1f}" if r.get("fwd_nstep") is not None else ""
        bwd = f"{r['bwd_nstep']:6.1f}" if r.get("bwd_nstep") is not None else ""
        print(f"{r['precision']:9s} {r['method']:18s} {r['batch']:5d} {r['steps_per_s']:8.3f} "
              f"{r['tokens_per_s']:10.0f} {peak:>9s} {fwd:>6s} {bwd:>6s} {ratio:>23s}")
    print(f"paper: DEQ-Transformer (medium) / 18-layer Transformer-XL training time = {PAPER_TIME_RATIO}x; "
          "goal with the phantom gradients: <= 1.5x")


# ----------------------------------------------------------------------------- 3. bf16 training

def markov_tokens(n_token: int, length: int, batch: int, *, seed: int = 0) -> torch.Tensor:
    """``batch`` streams of a fixed random Markov chain: each token has 4 successors, probabilities .4/.3/.2/.1.

    The entropy rate is 1.28 nats: the best achievable perplexity is 3.6.
    """
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, n_token, (n_token, 4), generator=gen)
    choice = torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), batch * length, replacement=True,
                               generator=gen).view(batch, length)
    out = torch.empty(batch, length, dtype=torch.int64)
    out[:, 0] = torch.randint(0, n_token, (batch,), generator=gen)
    for t in range(1, length):
        out[:, t] = successors[out[:, t - 1], choice[:, t]]
    return out


def _train(precision: str, device: torch.device, *, quick: bool) -> dict:
    kw = (dict(n_token=32, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=16) if quick else
          dict(n_token=512, d_model=256, n_head=4, d_head=64, d_inner=1024, mem_len=64))
    steps, batch, seq, window = (60, 8, 16, 10) if quick else (300, 32, 64, 50)
    torch.manual_seed(0)
    model = DEQTransformerLM(**kw, dropout=0.0, init_std=0.1 if quick else 0.05,
                             deq_layer=_deq_layer(max_iter=15, backward=deq.Implicit(tol=1e-3, max_iter=15)))
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if quick else 2e-3)
    data = markov_tokens(kw["n_token"], steps * seq + 1, batch).to(device)
    mems, losses, curve = None, [], []
    start = time.perf_counter()
    for i in range(steps):
        seg = data[:, i * seq:(i + 1) * seq + 1]
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            out = model(seg[:, :-1], seg[:, 1:], mems=mems)
        out.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        mems = out.mems
        losses.append(out.loss.detach().float())
        if (i + 1) % window == 0:
            ppl = math.exp(torch.stack(losses[-window:]).mean().item())
            curve.append(dict(step=i + 1, train_ppl=ppl))
    _sync(device)
    first, last = curve[0]["train_ppl"], curve[-1]["train_ppl"]
    return dict(precision=precision, curve=curve, first_ppl=first, last_ppl=last, falling=last < 0.7 * first,
                seconds=time.perf_counter() - start, steps=steps, batch=batch, seq=seq)


def training_section(device: torch.device, *, quick: bool) -> dict:
    print(f"\n== 3. bf16 training of a small DEQ-Transformer on a synthetic Markov corpus (best ppl ~3.6) ==")
    try:
        result = _train("bf16", device, quick=quick)
    except Exception as exc:
        print(f"bf16: FAILED {_error(exc)}; the same loop in fp32, to show it trains:")
        result = dict(precision="bf16", error=_error(exc), fp32=_train("fp32", device, quick=quick))
    shown = result.get("fp32", result)
    print(f"{'step':>6s} {'train ppl':>10s}   ({shown['precision']}, batch {shown['batch']} x {shown['seq']} "
          f"tokens, {shown['seconds']:.1f} s)")
    for point in shown["curve"]:
        print(f"{point['step']:6d} {point['train_ppl']:10.2f}")
    verdict = "falling" if shown["falling"] else "NOT falling"
    print(f"train perplexity {shown['first_ppl']:.1f} -> {shown['last_ppl']:.1f}: {verdict}")
    return result


# ----------------------------------------------------------------------------- 4. host syncs

class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device, by name.

    ``_local_scalar_dense`` (``.item()``, ``bool(t)``), ops whose output shape
    depends on values (``nonzero``, ``masked_select``, ``unique``, boolean
    indexing) or that return host values (``equal``, ``is_nonzero``), and copies
    from a CUDA tensor to the CPU. Exact for ops that go through the
    dispatcher (autograd's backward ops included).
    """

    SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal", "aten.is_nonzero",
               "aten._unique2", "aten.unique_consecutive", "aten.unique_dim"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def _syncs(self, func, args, kwargs) -> str | None:
        name = func._overloadpacket._qualified_op_name.replace("::", ".")
        if name in self.SYNCING:
            return name
        if name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                        for i in (args[1] if len(args) > 1 else ())):
            return "aten.index (boolean)"
        if name in ("aten._to_copy", "aten.copy_"):
            src = args[0] if name == "aten._to_copy" else args[1]
            dst_device = kwargs.get("device") if name == "aten._to_copy" else args[0].device
            if isinstance(src, torch.Tensor) and src.is_cuda and dst_device is not None \
                    and torch.device(dst_device).type == "cpu":
                return f"{name} (device to host)"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self._syncs(func, args, kwargs)
        if name is not None:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _counted_phase(fn, device: torch.device) -> tuple[SyncCounter, int | None]:
    """Run ``fn`` counting syncs by dispatch and, on CUDA, by ``set_sync_debug_mode("warn")``."""
    counter = SyncCounter()
    warned = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with counter:
                fn()
            _sync(device)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    if device.type == "cuda":
        warned = sum("synchronizing" in str(w.message) for w in caught)
    return counter, warned


def syncs_section(device: torch.device, *, quick: bool) -> list[dict]:
    kw = (dict(n_token=64, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=8) if quick else
          dict(n_token=512, d_model=256, n_head=4, d_head=64, d_inner=1024, mem_len=64))
    batch, seq = (4, 8) if quick else (16, 64)
    tokens = markov_tokens(kw["n_token"], 2 * seq + 1, batch).to(device)
    rows = []
    for solver in ("anderson", "broyden", "fixed_point"):
        torch.manual_seed(0)
        layer = functools.partial(deq.DEQLayer, solver=solver, tol=1e-12, max_iter=12, on_nonconvergence="ignore",
                                  fix_rng=False, backward=deq.Implicit(solver=solver, tol=1e-12, max_iter=12))
        model = DEQTransformerLM(**kw, dropout=0.1, deq_layer=layer).to(device).train()
        mems = model(tokens[:, :seq], tokens[:, 1:seq + 1]).mems
        out = {}
        fwd, fwd_warned = _counted_phase(
            lambda: out.setdefault("loss", model(tokens[:, seq:-1], tokens[:, seq + 1:], mems=mems).loss), device)
        res = model.deq.last_result
        bwd, bwd_warned = _counted_phase(lambda: out["loss"].backward(), device)
        n_bwd = model.deq.last_result.backward.n_iter
        rows.append(dict(solver=solver, fwd_iters=res.n_iter, fwd_syncs=fwd.total, fwd_by_op=fwd.counts,
                         fwd_per_iter=fwd.total / res.n_iter, fwd_cuda_warned=fwd_warned, bwd_iters=n_bwd,
                         bwd_syncs=bwd.total, bwd_by_op=bwd.counts, bwd_per_iter=bwd.total / n_bwd,
                         bwd_cuda_warned=bwd_warned))
    _print_syncs(rows, device)
    return rows


def _print_syncs(rows: list[dict], device: torch.device) -> None:
    print("\n== 4. host syncs of one DEQ training step (forward solve + readout; backward solve), "
          "counted by op ==")
    head = (f"{'solver':12s} {'fwd iters':>9s} {'fwd syncs':>9s} {'per iter':>8s} {'bwd iters':>9s} "
            f"{'bwd syncs':>9s} {'per iter':>8s}")
    if device.type == "cuda":
        head += f" {'cuda-reported fwd/bwd':>22s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['solver']:12s} {r['fwd_iters']:9d} {r['fwd_syncs']:9d} {r['fwd_per_iter']:8.2f} "
                f"{r['bwd_iters']:9d} {r['bwd_syncs']:9d} {r['bwd_per_iter']:8.2f}")
        if device.type == "cuda":
            line += f" {str(r['fwd_cuda_warned']) + ' / ' + str(r['bwd_cuda_warned']):>22s}"
        print(line)
    for r in rows:
        print(f"{r['solver']}: forward {r['fwd_by_op']}; backward {r['bwd_by_op']}")


def checks_section(device: torch.device, *, quick: bool) -> list[dict]:
    """Forward solve time of the WT103-width block with a host sync every iteration and with ``check_every="auto"``."""
    kw = (dict(n_token=64, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=8) if quick else
          dict(n_token=1000, d_model=700, n_head=10, d_head=70, d_inner=48000, mem_len=150))
    batch, seq = (2, 8) if quick else (56, 150)
    torch.manual_seed(0)
    model = DEQTransformerLM(**kw, dropout=0.0, deq_layer=_deq_layer(max_iter=30)).to(device).eval()
    tokens = markov_tokens(kw["n_token"], seq, batch).to(device)
    captured = {}
    real = model.deq.forward

    def capture(x, z0=None, **kwargs):
        captured.update(x=x, z0=z0)
        return real(x, z0, **kwargs)

    model.deq.forward = capture
    with torch.no_grad():
        model(tokens)
    model.deq.forward = real
    block, x, z0 = model.deq.f, captured["x"], captured["z0"]
    rows = []
    for every in (1, "auto"):
        times, result = [], None
        for _ in range(2 if quick else 5):
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                result = deq.solve(lambda z: block(z, x), z0, solver="anderson", tol=1e-3, max_iter=30,
                                   check_every=every, time_dim=1)
            _sync(device)
            times.append(time.perf_counter() - start)
        counter, _ = _counted_phase(lambda: deq.solve(lambda z: block(z, x), z0, solver="anderson", tol=1e-3,
                                                      max_iter=30, check_every=every, time_dim=1), device)
        rows.append(dict(check_every=str(every), seconds=statistics.median(times), n_iter=result.n_iter,
                         nstep_mean=result.nstep.double().mean().item(), syncs=counter.total))
    print(f"\n== 5. forward solve of the block at d_model {kw['d_model']}, batch {batch} x {seq} (causal Anderson, "
          f"rel 1e-3, <= 30): a host sync per iteration against check_every='auto' ==")
    print(f"{'check_every':12s} {'ms':>9s} {'iters':>6s} {'nstep':>6s} {'syncs':>6s}")
    for r in rows:
        print(f"{r['check_every']:12s} {r['seconds'] * 1e3:9.1f} {r['n_iter']:6d} {r['nstep_mean']:6.1f} "
              f"{r['syncs']:6d}")
    print(f"auto / every iteration: {rows[1]['seconds'] / rows[0]['seconds']:.3f} of the time "
          f"(on the CPU 'auto' is 1: the same)")
    return rows


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (a CPU smoke run in seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out", help="directory for gpu_check.json")
    parser.add_argument("--sections", default="memory,speed,training,syncs,checks",
                        help="comma-separated subset of memory,speed,training,syncs,checks")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device: cpu, torch {torch.__version__}" + ("" if args.quick else " (the full sizes want a GPU)"))
    sections = dict(memory=memory_section, speed=speed_section, training=training_section, syncs=syncs_section,
                    checks=checks_section)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(sections))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(sections)}")
    report = dict(device=str(device), torch=torch.__version__, quick=args.quick)
    start = time.perf_counter()
    for name in wanted:
        t0 = time.perf_counter()
        try:
            report[name] = sections[name](device, quick=args.quick)
        except Exception as exc:  # one broken section must not hide the others
            traceback.print_exc()
            report[name] = dict(error=_error(exc))
            print(f"section {name}: FAILED {_error(exc)}")
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]")
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\ntotal {report['seconds']:.1f} s; wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
