"""The DEQ paper's memory table at a size this machine runs: DEQ vs its explicit twin.

For each model family (DEQ-Transformer, DEQ-TrellisNet) one set of weights is
run as a DEQ with three backward passes (Implicit, NPG(5, 0.5), UPG(5, 0.5)) and
as the explicit weight-tied twin unrolled L = 6, 12, 24 times (the same module
with ``deq.unroll_steps = L``: equal parameters by construction). Per row:

* memory of one training step: bytes saved for backward (activations; the
  parameters themselves are excluded, they are the same for every row), counted
  with ``torch.autograd.graph.saved_tensors_hooks``, each storage once, for the
  whole model and for the equilibrium layer alone ("layer": what the DEQ/explicit
  choice changes; the embedding and softmax are shared by every row), and the
  layer's activations alone ("act": the bytes that grow with the batch, i.e. the
  layer's bytes at batch 2B minus those at batch B; this leaves out what is
  saved once whatever the batch, such as the weight-normalised weights); on
  CUDA also ``torch.cuda.max_memory_allocated`` of the step;
* time per training step (forward + backward) and per evaluation step
  (``eval()``, no grad), median of ``--repeats``, and their ratio to the
  12-layer twin measured in the same run;
* forward f-calls and backward solve steps per sample (DEQ rows).

``--paper`` measures the saved bytes (not the time) of the paper-sized PTB
presets: DEQ-TrellisNet 24M (batch 16, 110 tokens) and the PTB DEQ-Transformer
(batch 16, 70 tokens).

Run: ``python experiments/benchmarks/memory.py [--quick | --paper] [--out DIR] [--device cuda]``.
Writes ``memory.json`` into ``--out``.
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
from deq.models.transformer import TRANSFORMER_PRESETS, DEQTransformerLM
from deq.models.trellisnet import TRELLISNET_PRESETS, DEQTrellisNetLM


class SavedBytes:
    """Context manager: bytes of the distinct storages autograd saves, parameters excluded.

    Storages first saved while ``layer`` runs are also counted apart (``in_layer``):
    the equilibrium part, without the embedding and softmax that every row shares.
    """

    def __init__(self, params, layer: torch.nn.Module):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, tuple[int, bool]] = {}
        self.inside = False
        self._layer = layer

    def _pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.param_ptrs and ptr not in self.storages:
            self.storages[ptr] = (t.untyped_storage().nbytes(), self.inside)
        return t

    def _enter_layer(self, *args):
        self.inside = True

    def _leave_layer(self, module, args, output):
        # The layer's output is what the readout consumes (and saves) for every
        # row alike; for the explicit twin it is first saved outside the layer,
        # so book it outside for the DEQ rows too.
        self.inside = False
        for t in output if isinstance(output, tuple) else (output,):
            ptr = t.untyped_storage().data_ptr()
            if ptr in self.storages:
                self.storages[ptr] = (self.storages[ptr][0], False)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._handles = [self._layer.register_forward_pre_hook(self._enter_layer),
                         self._layer.register_forward_hook(self._leave_layer)]
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    @property
    def in_layer(self) -> int:
        return sum(n for n, inside in self.storages.values() if inside)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _families(mode: str) -> dict[str, dict]:
    if mode == "paper":
        # The paper-sized PTB presets, memory only: saved bytes do not depend on
        # the iteration count (tests/test_grad.py pins it), so the DEQ rows run
        # 3 iterations and nothing is timed (one f-call here takes seconds on a CPU).
        return {
            "transformer ptb": dict(cls=DEQTransformerLM, kw=TRANSFORMER_PRESETS["ptb"], batch=16, seq=70,
                                    max_iter=3),
            "trellisnet ptb": dict(cls=DEQTrellisNetLM, kw=TRELLISNET_PRESETS["ptb"], batch=16, seq=110,
                                   max_iter=3),
        }
    if mode == "quick":
        return {
            "transformer": dict(cls=DEQTransformerLM, kw=dict(n_token=200, d_model=32, n_head=2, d_head=16,
                                                               d_inner=64, mem_len=8), batch=2, seq=8),
            "trellisnet": dict(cls=DEQTrellisNetLM, kw=dict(ntoken=200, ninp=16, nhid=32, nout=16),
                               batch=2, seq=8),
        }
    return {
        "transformer": dict(cls=DEQTransformerLM, kw=dict(n_token=2000, d_model=256, n_head=4, d_head=64,
                                                           d_inner=1024, mem_len=64), batch=8, seq=64),
        "trellisnet": dict(cls=DEQTrellisNetLM, kw=dict(ntoken=2000, ninp=128, nhid=384, nout=128),
                           batch=8, seq=64),
    }


def _rows(quick: bool):
    backward = {"Implicit": deq.Implicit(tol=1e-4, max_iter=35), "NPG(5,0.5)": deq.NPG(k=5, damping=0.5),
                "UPG(5,0.5)": deq.UPG(k=5, damping=0.5)}
    rows = [(name, bw, None) for name, bw in backward.items()]
    rows += [(f"explicit L={L}", None, L) for L in (6, 12, 24)]
    return rows


def measure_family(name: str, spec: dict, *, device: torch.device, repeats: int, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    layer = functools.partial(deq.DEQLayer, solver=deq.Anderson(m=5), tol=1e-3, max_iter=spec.get("max_iter", 30),
                              on_nonconvergence="ignore", fix_rng=False)
    model = spec["cls"](**spec["kw"], deq_layer=layer).to(device)
    vocab = spec["kw"].get("n_token", spec["kw"].get("ntoken"))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2 * spec["batch"], spec["seq"] + 1), generator=gen).to(device)
    inp, tgt = tokens[:spec["batch"], :-1], tokens[:spec["batch"], 1:]
    # One warm segment so memory (transformer) / history (trellisnet) is present, as in training.
    with torch.no_grad():
        mems = model(inp, tgt).mems
        mems2 = model(tokens[:, :-1], tokens[:, 1:]).mems

    out = []
    for label, bw, unroll in _rows(quick):
        model.deq.unroll_steps = unroll
        if bw is not None:
            model.deq.backward = bw
        model.train()

        def train_step():
            model.zero_grad(set_to_none=True)
            model(inp, tgt, mems=mems).loss.backward()

        if repeats:
            train_step()  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        meter = SavedBytes(model.parameters(), model.deq)
        model.zero_grad(set_to_none=True)
        with meter:
            loss = model(inp, tgt, mems=mems).loss
        loss.backward()
        res = model.deq.last_result
        # Saved bytes that grow with the batch (activations), without the
        # batch-independent ones (weights, weight-norm outputs, positions):
        # the same step at batch 2B minus batch B.
        meter2 = SavedBytes(model.parameters(), model.deq)
        with meter2:
            loss2 = model(tokens[:, :-1], tokens[:, 1:], mems=mems2).loss
        loss2.backward()
        model.zero_grad(set_to_none=True)
        peak_cuda = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None
        model.eval()

        def eval_step():
            with torch.no_grad():
                model(inp, tgt, mems=mems)

        t_train = t_eval = float("nan")
        if repeats:
            model.train()
            t_train = _median_time(train_step, repeats, device)
            model.eval()
            eval_step()
            t_eval = _median_time(eval_step, repeats, device)
        out.append(dict(family=name, method=label, saved_bytes=meter.total, layer_bytes=meter.in_layer,
                        layer_act_bytes=meter2.in_layer - meter.in_layer,
                        cuda_peak_bytes=peak_cuda,
                        train_s=t_train, eval_s=t_eval,
                        fwd_nstep=float(res.nstep.double().mean()) if unroll is None else float(unroll),
                        bwd_nstep=(float(res.backward.nstep.double().mean())
                                   if unroll is None and res.backward is not None else None)))
    ref = next(r for r in out if r["method"] == "explicit L=12")
    for r in out:
        r["mem_vs_L12"] = r["saved_bytes"] / ref["saved_bytes"]
        r["layer_mem_vs_L12"] = r["layer_bytes"] / ref["layer_bytes"]
        r["layer_act_vs_L12"] = r["layer_act_bytes"] / ref["layer_act_bytes"]
        r["train_time_vs_L12"] = r["train_s"] / ref["train_s"]
        r["eval_time_vs_L12"] = r["eval_s"] / ref["eval_s"]
    return out


def print_table(rows: list[dict]) -> None:
    head = (f"{'family':12s} {'method':15s} {'saved MiB':>10s} {'vs L=12':>8s} {'layer MiB':>10s} {'vs L=12':>8s} "
            f"{'act MiB':>8s} {'vs L=12':>8s} "
            f"{'train s':>9s} {'vs L=12':>8s} "
            f"{'eval s':>8s} {'vs L=12':>8s} {'fwd f':>6s} {'bwd it':>6s}")
    if any(r["cuda_peak_bytes"] is not None for r in rows):
        head += f" {'cuda MiB':>9s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['family']:12s} {r['method']:15s} {r['saved_bytes'] / 2**20:10.2f} {r['mem_vs_L12']:8.1%} "
                f"{r['layer_bytes'] / 2**20:10.2f} {r['layer_mem_vs_L12']:8.1%} "
                f"{r['layer_act_bytes'] / 2**20:8.2f} {r['layer_act_vs_L12']:8.1%} "
                f"{r['train_s']:9.4f} {r['train_time_vs_L12']:8.2f} {r['eval_s']:8.4f} {r['eval_time_vs_L12']:8.2f} "
                f"{r['fwd_nstep']:6.1f} {'' if r['bwd_nstep'] is None else format(r['bwd_nstep'], '6.1f'):>6s}")
        if r["cuda_peak_bytes"] is not None:
            line += f" {r['cuda_peak_bytes'] / 2**20:9.1f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (CI smoke run)")
    parser.add_argument("--out", default="bench_out", help="directory for memory.json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--paper", action="store_true",
                        help="the paper-sized PTB presets, saved bytes only (no timing; minutes on a CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mode = "quick" if args.quick else "paper" if args.paper else "default"
    repeats = 1 if args.quick else 0 if args.paper else args.repeats
    rows = []
    for name, spec in _families(mode).items():
        rows += measure_family(name, spec, device=device, repeats=repeats, quick=args.quick)
    print(f"device={device} threads={args.threads} repeats={repeats} (median)")
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("memory_paper.json" if args.paper else "memory.json")).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
