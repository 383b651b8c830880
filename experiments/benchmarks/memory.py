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

``--protocol`` is the DEQ paper's own memory comparison: batch 15, sequence
length 150, word embeddings excluded, each DEQ (Implicit, NPG(5, 0.8),
UPG(5, 0.8)) against the explicit twin the paper sets it against: the WT103
medium DEQ-Transformer against 18 layers, the WT103 DEQ-TrellisNet against 70
and the PTB DEQ-TrellisNet against 60 (the paper: 1.2 GB vs 8.5 GB, 14%, for
the last). Per row: the saved bytes of one training step without those of the
word embedding and softmax ("model") and of the equilibrium layer alone,
counted without keeping the tensors (so any depth fits in memory); on CUDA
also ``torch.cuda.max_memory_allocated`` of a real step (embedding and softmax
parameters frozen). See :func:`measure_protocol`.

Run: ``python experiments/benchmarks/memory.py [--quick | --paper | --protocol] [--family NAME] [--out DIR]
[--device cuda]``. Writes ``memory.json`` (``memory_paper.json``, ``memory_protocol.json``) into ``--out``.
``--quick`` also checks that the twin's counted bytes extrapolate exactly from 2 and 3 layers.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef

import deq
from deq.models.transformer import TRANSFORMER_PRESETS, DEQTransformerLM
from deq.models.trellisnet import TRELLISNET_PRESETS, DEQTrellisNetLM


class SavedBytes:
    """Context manager: bytes of the distinct storages autograd saves, parameters excluded.

    Storages are told apart by identity (a weak reference to each keeps its
    address from being reused while counting), each counted once, in the
    region of the module it was first saved in: ``layer`` (the equilibrium
    part, without the embedding and softmax that every row shares), the
    ``excluded`` modules (word embedding and softmax, for the paper's protocol)
    or elsewhere. With ``retain=False`` the saved tensors are not kept: the
    count is that of a graph one never runs backward through, so a step of any
    depth can be counted in the memory of one layer.
    """

    def __init__(self, params, layer: torch.nn.Module, *, excluded: tuple[torch.nn.Module, ...] = (),
                 retain: bool = True):
        self.param_refs = {StorageWeakRef(p.untyped_storage()) for p in params}
        self.storages: dict[StorageWeakRef, tuple[int, str]] = {}
        self.region = "other"
        self.retain = retain
        self._layer = layer
        self._excluded = excluded

    def _pack(self, t):
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in self.param_refs and ref not in self.storages:
            self.storages[ref] = (t.untyped_storage().nbytes(), self.region)
        return t if self.retain else None

    def _region_hooks(self, module: torch.nn.Module, region: str) -> list:
        def enter(*args):
            self.region = region

        def leave(module, args, output):
            self.region = "other"

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def _leave_layer(self, module, args, output):
        # The layer's output is what the readout consumes (and saves) for every
        # row alike; for the explicit twin it is first saved outside the layer,
        # so book it outside for the DEQ rows too.
        self.region = "other"
        for t in output if isinstance(output, tuple) else (output,):
            ref = StorageWeakRef(t.untyped_storage())
            if ref in self.storages:
                self.storages[ref] = (self.storages[ref][0], "other")

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._handles = [self._layer.register_forward_pre_hook(lambda *a: setattr(self, "region", "layer")),
                         self._layer.register_forward_hook(self._leave_layer)]
        for module in self._excluded:
            self._handles += self._region_hooks(module, "excluded")
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def bytes_in(self, *regions: str) -> int:
        return sum(n for n, region in self.storages.values() if region in regions)

    @property
    def total(self) -> int:
        return self.bytes_in("layer", "excluded", "other")

    @property
    def in_layer(self) -> int:
        return self.bytes_in("layer")


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
    single = (tokens[:spec["batch"], :-1], tokens[:spec["batch"], 1:])
    double = (tokens[:, :-1], tokens[:, 1:])
    # One warm segment so memory (transformer) / history (trellisnet) is present, as in training.
    with torch.no_grad():
        single += (model(*single).mems,)
        double += (model(*double).mems,)

    out = []
    for label, bw, unroll in _rows(quick):
        model.set_unroll_steps(unroll)
        if bw is not None:
            model.deq.backward = bw
        out.append(dict(family=name, method=label, **_measure_method(model, single, double, device, repeats)))
    ref = next(r for r in out if r["method"] == "explicit L=12")
    for r in out:
        r["mem_vs_L12"] = r["saved_bytes"] / ref["saved_bytes"]
        r["layer_mem_vs_L12"] = r["layer_bytes"] / ref["layer_bytes"]
        r["layer_act_vs_L12"] = r["layer_act_bytes"] / ref["layer_act_bytes"]
        r["train_time_vs_L12"] = r["train_s"] / ref["train_s"]
        r["eval_time_vs_L12"] = r["eval_s"] / ref["eval_s"]
    return out


def _measure_method(model: torch.nn.Module, single: tuple, double: tuple, device: torch.device, repeats: int) -> dict:
    """Saved bytes, CUDA peak and step times of one method; ``single``/``double``: (inp, tgt, mems) at B and 2B."""
    unroll = model.deq.unroll_steps
    model.train()
    if repeats:
        _train_step(model, single)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    meter = SavedBytes(model.parameters(), model.deq)
    model.zero_grad(set_to_none=True)
    with meter:
        loss = model(single[0], single[1], mems=single[2]).loss
    loss.backward()
    res = model.deq.last_result
    # Saved bytes that grow with the batch (activations), without the
    # batch-independent ones (weights, weight-norm outputs, positions):
    # the same step at batch 2B minus batch B.
    meter2 = SavedBytes(model.parameters(), model.deq)
    with meter2:
        loss2 = model(double[0], double[1], mems=double[2]).loss
    loss2.backward()
    model.zero_grad(set_to_none=True)
    peak_cuda = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None

    t_train = t_eval = float("nan")
    if repeats:
        model.train()
        t_train = _median_time(functools.partial(_train_step, model, single), repeats, device)
        model.eval()
        _eval_step(model, single)
        t_eval = _median_time(functools.partial(_eval_step, model, single), repeats, device)
    model.eval()
    return dict(saved_bytes=meter.total, layer_bytes=meter.in_layer, layer_act_bytes=meter2.in_layer - meter.in_layer,
                cuda_peak_bytes=peak_cuda, train_s=t_train, eval_s=t_eval,
                fwd_nstep=float(res.nstep.double().mean()) if unroll is None else float(unroll),
                bwd_nstep=(float(res.backward.nstep.double().mean())
                           if unroll is None and res.backward is not None else None))


def _train_step(model: torch.nn.Module, batch: tuple) -> None:
    model.zero_grad(set_to_none=True)
    model(batch[0], batch[1], mems=batch[2]).loss.backward()


def _eval_step(model: torch.nn.Module, batch: tuple) -> None:
    with torch.no_grad():
        model(batch[0], batch[1], mems=batch[2])


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


# ----------------------------------------------------------------------------- the paper's protocol

PROTOCOL_BATCH, PROTOCOL_SEQ = 15, 150
PROTOCOL_BACKWARDS = {"Implicit": deq.Implicit(tol=1e-4, max_iter=35), "NPG(5,0.8)": deq.NPG(k=5, damping=0.8),
                      "UPG(5,0.8)": deq.UPG(k=5, damping=0.8)}


def _protocol_families(*, quick: bool = False) -> dict[str, dict]:
    """The DEQ paper's memory comparisons: each DEQ and the explicit twin it is set against.

    ``quick``: the same families at toy sizes (adaptive softmax kept) and 8-layer twins, for smoke runs.
    """
    transformer, trellis_wt103, trellis_ptb = (TRANSFORMER_PRESETS["wt103_medium"], TRELLISNET_PRESETS["wt103"],
                                               TRELLISNET_PRESETS["ptb"])
    depths = (18, 70, 60)
    if quick:
        transformer = dict(transformer, n_token=300, d_model=64, n_head=2, d_head=8, d_inner=32, mem_len=10,
                           cutoffs=[50, 100, 200])
        trellis_wt103 = dict(trellis_wt103, ntoken=300, ninp=16, nhid=32, nout=16, cutoffs=[50, 100])
        trellis_ptb = dict(trellis_ptb, ntoken=100, ninp=16, nhid=32, nout=16)
        depths = (8, 8, 8)
    return {
        "transformer wt103": dict(cls=DEQTransformerLM, kw=transformer, twin=depths[0],
                                  embeddings=lambda m: (m.word_emb, m.crit), paper=None),
        "trellisnet wt103": dict(cls=DEQTrellisNetLM, kw=trellis_wt103, twin=depths[1],
                                 embeddings=lambda m: (m.encoder, m.decoder), paper=None),
        "trellisnet ptb": dict(cls=DEQTrellisNetLM, kw=trellis_ptb, twin=depths[2],
                               embeddings=lambda m: (m.encoder, m.decoder), paper=(1.2, 8.5)),
    }


def _counted(model, inp, tgt, mems, embeddings) -> SavedBytes:
    """Saved bytes of one training-mode forward, nothing retained (counting needs no backward pass)."""
    meter = SavedBytes(model.parameters(), model.deq, excluded=embeddings, retain=False)
    with meter:
        model(inp, tgt, mems=mems)
    return meter


def _cuda_peak(model, inp, tgt, mems, device: torch.device) -> int:
    """``max_memory_allocated`` over one training step (forward + backward) above what was allocated before it."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model(inp, tgt, mems=mems).loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    model.zero_grad(set_to_none=True)
    return peak


def _twin_counts(model, inp, tgt, mems, embeddings, depth: int, *, extrapolate: bool) -> tuple[int, int]:
    """(model bytes without embeddings, layer bytes) of the explicit twin of ``depth`` layers.

    With ``extrapolate``: counted at 2 and 3 layers and extended linearly. Exact:
    from its second layer on, every layer saves the same tensors (the first one
    saves less, its input z = 0 needing no gradient), so the count is affine in
    the depth from 2 layers on (``--quick`` checks it against a direct count).
    """
    def count(layers):
        model.deq.unroll_steps = layers
        meter = _counted(model, inp, tgt, mems, embeddings)
        return meter.bytes_in("layer", "other"), meter.in_layer

    if not extrapolate:
        return count(depth)
    (m2, l2), (m3, l3) = count(2), count(3)
    return m2 + (depth - 2) * (m3 - m2), l2 + (depth - 2) * (l3 - l2)


def measure_protocol(name: str, spec: dict, *, device: torch.device, batch: int = PROTOCOL_BATCH,
                     seq: int = PROTOCOL_SEQ) -> list[dict]:
    """One family under the paper's protocol: batch 15, length 150, word embeddings excluded.

    "Excluded": the word-embedding and softmax modules' saved tensors are not
    counted and their parameters are frozen (no gradient buffers in the CUDA
    peak); their activations remain in the CUDA peak, the same for every row.
    On CPU the DEQ rows solve with 2 forward iterations (saved bytes do not
    depend on the iteration count) and the twin is extrapolated from 2 and 3
    layers; on CUDA the DEQ solves with the recipes' budget (30 forward
    iterations) and the twin runs at full depth.
    """
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    layer = functools.partial(deq.DEQLayer, solver=deq.Anderson(m=5), tol=1e-3, max_iter=30 if cuda else 2,
                              on_nonconvergence="ignore", fix_rng=False)
    model = spec["cls"](**spec["kw"], deq_layer=layer).to(device).train()
    embeddings = spec["embeddings"](model)
    for module in embeddings:
        module.requires_grad_(False)
    vocab = spec["kw"].get("n_token", spec["kw"].get("ntoken"))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, 2 * seq + 1), generator=gen).to(device)
    warm, inp, tgt = tokens[:, :seq], tokens[:, seq:-1], tokens[:, seq + 1:]
    with torch.no_grad():  # a warm segment, so the memory (transformer) / history (trellisnet) is there
        mems = model(warm, tokens[:, 1:seq + 1]).mems
    rows = []
    for label, backward in PROTOCOL_BACKWARDS.items():
        model.deq.unroll_steps, model.deq.backward = None, backward
        meter = _counted(model, inp, tgt, mems, embeddings)
        rows.append(dict(family=name, method=label, model_bytes=meter.bytes_in("layer", "other"),
                         layer_bytes=meter.in_layer, extrapolated=False,
                         cuda_peak_bytes=_cuda_peak(model, inp, tgt, mems, device) if cuda else None))
    depth = spec["twin"]
    model_bytes, layer_bytes = _twin_counts(model, inp, tgt, mems, embeddings, depth, extrapolate=not cuda)
    model.deq.unroll_steps = depth
    peak = _cuda_peak(model, inp, tgt, mems, device) if cuda else None
    rows.append(dict(family=name, method=f"explicit L={depth}", model_bytes=model_bytes, layer_bytes=layer_bytes,
                     extrapolated=not cuda, cuda_peak_bytes=peak))
    twin = rows[-1]
    for r in rows:
        r["model_vs_twin"] = r["model_bytes"] / twin["model_bytes"]
        r["layer_vs_twin"] = r["layer_bytes"] / twin["layer_bytes"]
        r["cuda_vs_twin"] = r["cuda_peak_bytes"] / twin["cuda_peak_bytes"] if cuda else None
        r["paper_gb"] = spec["paper"]
        r["batch"], r["seq"] = batch, seq
    return rows


def print_protocol_table(rows: list[dict]) -> None:
    cuda = any(r["cuda_peak_bytes"] is not None for r in rows)
    head = f"{'family':18s} {'method':14s} {'model MiB':>10s} {'vs twin':>8s} {'layer MiB':>10s} {'vs twin':>8s}"
    if cuda:
        head += f" {'cuda peak MiB':>14s} {'vs twin':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['family']:18s} {r['method'] + ('*' if r['extrapolated'] else ''):14s} "
                f"{r['model_bytes'] / 2**20:10.1f} {r['model_vs_twin']:8.1%} "
                f"{r['layer_bytes'] / 2**20:10.1f} {r['layer_vs_twin']:8.1%}")
        if cuda:
            line += f" {r['cuda_peak_bytes'] / 2**20:14.1f} {r['cuda_vs_twin']:8.1%}"
        print(line)
    print("model: saved bytes of a training step without the word embedding and softmax (parameters never "
          "counted);")
    print("layer: the equilibrium layer alone; * extrapolated from 2 and 3 layers (exact, see _twin_counts).")
    for r in rows:
        if r["paper_gb"] is not None and r["method"] == "Implicit":
            deq_gb, twin_gb = r["paper_gb"]
            print(f"paper ({r['family']}): DEQ {deq_gb} GB vs explicit {twin_gb} GB = {deq_gb / twin_gb:.1%}")


def check_twin_extrapolation(device: torch.device) -> None:
    """The twin's counted bytes, extrapolated from 2 and 3 layers, equal a direct count (quick sizes)."""
    for name, spec in _families("quick").items():
        torch.manual_seed(0)
        layer = functools.partial(deq.DEQLayer, on_nonconvergence="ignore")
        model = spec["cls"](**spec["kw"], deq_layer=layer).to(device).train()
        tokens = torch.randint(0, 200, (spec["batch"], spec["seq"] + 1), generator=torch.Generator().manual_seed(1))
        inp, tgt = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        mems = model(inp, tgt).mems
        direct = _twin_counts(model, inp, tgt, mems, (), 12, extrapolate=False)
        extrapolated = _twin_counts(model, inp, tgt, mems, (), 12, extrapolate=True)
        if direct != extrapolated:
            raise RuntimeError(f"{name}: the twin's bytes at 12 layers are {direct}, extrapolated {extrapolated}")
        print(f"{name}: the 12-layer twin's counted bytes equal their extrapolation from 2 and 3 layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (CI smoke run)")
    parser.add_argument("--out", default="bench_out", help="directory for memory.json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--paper", action="store_true",
                        help="the paper-sized PTB presets, saved bytes only (no timing; minutes on a CPU)")
    parser.add_argument("--protocol", action="store_true",
                        help="the paper's protocol: batch 15, length 150, word embeddings excluded, against the "
                             "18-layer Transformer and the 70/60-layer TrellisNets (long on a CPU)")
    parser.add_argument("--family", default="", help="only the families whose name contains this string")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.protocol:
        rows = [r for name, spec in _protocol_families().items() if args.family in name
                for r in measure_protocol(name, spec, device=device)]
        print(f"device={device} threads={args.threads} batch={PROTOCOL_BATCH} length={PROTOCOL_SEQ}")
        print_protocol_table(rows)
        (out / "memory_protocol.json").write_text(json.dumps(rows, indent=2))
        return
    mode = "quick" if args.quick else "paper" if args.paper else "default"
    repeats = 1 if args.quick else 0 if args.paper else args.repeats
    rows = []
    for name, spec in _families(mode).items():
        if args.family not in name:
            continue
        rows += measure_family(name, spec, device=device, repeats=repeats, quick=args.quick)
    print(f"device={device} threads={args.threads} repeats={repeats} (median)")
    print_table(rows)
    if args.quick:
        check_twin_extrapolation(device)
    (out / ("memory_paper.json" if args.paper else "memory.json")).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
