"""The Hydra configs: every experiment composes, instantiates, and builds what its YAML says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import deq

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
sys.path.insert(0, str(REPO / "experiments"))
import _loop  # noqa: E402  (registers the ${repo_path:...} resolver)

_loop.register_resolvers()

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# Full-size models: built on the meta device (no memory, no initialisation cost).
HUGE = {"ptb_trellisnet", "wt103_transformer", "wt103_transformer_upg", "wt103_transformer_small",
        "wt103_trellisnet"}


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def _compose(*overrides: str):
    cfg = compose("train", overrides=list(overrides))
    if cfg.data.vocab_size is None:  # the samples take it from the corpus; any size builds the model
        cfg.data.vocab_size = 500
    return cfg


def _plain(node) -> dict:
    """A config node as plain Python, without Hydra's special keys."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}


def _check_fields(obj, node) -> None:
    """Every key of the YAML node equals the field of the same name on the object."""
    for key, value in _plain(node).items():
        got = getattr(obj, key)
        if key == "solver" and isinstance(value, str):  # a name builds the registered default object
            assert got == deq.get_solver(value), key
        else:
            assert got == value, f"{type(obj).__name__}.{key} = {got!r}, YAML says {value!r}"


def test_experiment_list_is_complete():
    assert set(EXPERIMENTS) >= {"copy_memory", "ptb_trellisnet", "wt103_transformer", "wt103_transformer_upg",
                                "wt103_transformer_small", "wt103_trellisnet", "ptb_sample_transformer",
                                "ptb_sample_trellisnet"}


def test_default_is_copy_memory():
    # The embedded default composes to exactly the copy_memory overlay.
    a, b = _compose(), _compose("experiment=copy_memory")
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)
    assert a.data.task == "copy_memory" and a.train.compare_explicit


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_instantiates_what_the_yaml_says(name):
    cfg = _compose(f"experiment={name}")
    solver, grad = instantiate(cfg.solver), instantiate(cfg.grad)
    assert isinstance(solver, deq.Solver) and isinstance(grad, deq.Backward)
    _check_fields(solver, cfg.solver)
    if cfg.grad._target_ != "deq.JFB":
        _check_fields(grad, cfg.grad)

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = instantiate(cfg.optim.optimizer)([param])
    group = optimizer.param_groups[0]
    for key, value in _plain(cfg.optim.optimizer).items():
        got = group[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    _loop.Schedule(optimizer, cfg.optim.scheduler)  # a known schedule with valid options

    if name in HUGE:
        with torch.device("meta"):
            model = _loop.build_model(cfg)
    else:
        model = _loop.build_model(cfg)
    layer = model.deq
    assert isinstance(layer, deq.DEQLayer)
    assert layer.solver == solver and layer.backward == grad
    d = cfg.deq
    assert (layer.tol, layer.max_iter, layer.stop_mode) == (d.tol, d.max_iter, d.stop_mode)
    assert layer.eval_tol == (d.tol if d.eval_tol is None else d.eval_tol)
    assert layer.eval_max_iter == (d.max_iter if d.eval_max_iter is None else d.eval_max_iter)
    assert layer.fix_rng == d.fix_rng and layer.on_nonconvergence == d.on_nonconvergence

    m = cfg.model
    if m._target_.endswith("DEQTransformerLM"):
        block = layer.f
        assert (model.n_token, model.d_model, model.n_head, model.d_head) == (m.n_token, m.d_model, m.n_head,
                                                                              m.d_head)
        assert block.d_inner == m.d_inner and block.pre_lnorm == m.pre_lnorm and model.mem_len == m.mem_len
        assert model.dropout == m.dropout and model.word_emb.cutoffs == tuple(m.cutoffs)
        assert model.word_emb.div_val == m.div_val
    else:
        assert (model.ntoken, model.ninp, model.nhid, model.nout) == (m.ntoken, m.ninp, m.nhid, m.nout)
        assert model.kernel_size == m.kernel_size and model.dropout == m.dropout
        assert model.dropouti == m.dropouti and model.emb_dropout == m.emb_dropout
        assert model.cutoffs == (tuple(m.cutoffs) if m.cutoffs is not None else ())
        assert layer.f.drop.p == m.dropouth
    if name == "ptb_trellisnet":  # the DEQ paper's 24M-parameter PTB DEQ-TrellisNet
        assert abs(model.num_parameters() - 24e6) < 0.05 * 24e6
    if name == "wt103_transformer":  # the paper's 98M-parameter medium DEQ-Transformer
        assert abs(model.num_parameters() - 98e6) < 0.03 * 98e6


def test_wt103_transformer_recipe():
    cfg = _compose("experiment=wt103_transformer")
    assert (cfg.model.d_model, cfg.model.n_head, cfg.model.d_head, cfg.model.d_inner) == (700, 10, 70, 48000)
    assert list(cfg.model.cutoffs) == [20000, 40000, 200000] and cfg.model.div_val == 4
    assert cfg.model.dropout == 0.05 and cfg.model.weight_norm and not cfg.model.pre_lnorm
    assert (cfg.data.tgt_len, cfg.model.mem_len, cfg.train.eval_mem_len, cfg.data.batch_size) == (150, 150, 300, 56)
    assert cfg.optim.optimizer._target_ == "torch.optim.Adam" and cfg.optim.optimizer.lr == 2.5e-4
    s = cfg.optim.scheduler
    assert (s.name, s.warmup_steps, s.max_steps, cfg.optim.clip) == ("cosine", 16000, 300000, 0.25)
    assert (cfg.train.pretrain_steps, cfg.train.unroll_steps) == (32000, 2)
    assert cfg.solver._target_ == "deq.Anderson" and (cfg.deq.max_iter, cfg.deq.tol, cfg.deq.stop_mode) == (
        30, 1e-3, "rel")
    assert instantiate(cfg.grad) == deq.Implicit(solver="broyden", tol=1e-3, max_iter=35)
    upg = _compose("experiment=wt103_transformer_upg")
    assert instantiate(upg.grad) == deq.UPG(k=5, damping=0.8)
    assert OmegaConf.to_container(upg.model) == OmegaConf.to_container(cfg.model)


def test_ptb_trellisnet_recipe():
    cfg = _compose("experiment=ptb_trellisnet")
    m = cfg.model
    assert (m.dropout, m.dropouti, m.dropouth, m.wdrop, m.emb_dropout) == (0.45, 0.45, 0.28, 0.5, 0.1)
    o = cfg.optim.optimizer
    assert (o._target_, o.lr, o.weight_decay) == ("torch.optim.SGD", 20.0, 1.2e-6)
    assert (cfg.data.batch_size, cfg.data.tgt_len) == (16, 110)
    assert cfg.train.pretrain_steps > 0 and cfg.optim.scheduler.name == "plateau"


def _group_objects(group: str) -> dict:
    return {p.stem: instantiate(OmegaConf.load(p)) for p in sorted((CONFIGS / group).glob("*.yaml"))}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_sweeps_over_solvers_and_backward_passes(name):
    # An experiment that set grad or solver keys inline would break `-m grad=implicit,upg,npg`
    # (UPG takes no tol): each option must give exactly its group file's object.
    for grad, expected in _group_objects("grad").items():
        assert instantiate(_compose(f"experiment={name}", f"grad={grad}").grad) == expected, grad
    for solver, expected in _group_objects("solver").items():
        assert instantiate(_compose(f"experiment={name}", f"solver={solver}").solver) == expected, solver


def test_sample_data_root_is_absolute_and_independent_of_the_working_directory(tmp_path, monkeypatch):
    expected = (REPO.parent / "shared" / "data").resolve()
    first = _compose("experiment=ptb_sample_transformer").data.root
    monkeypatch.chdir(tmp_path)
    second = _compose("experiment=ptb_sample_transformer").data.root
    assert Path(first) == Path(second) == expected
    assert _compose("data.root=/somewhere/else", "data=ptb").data.root == "/somewhere/else"


def test_unknown_schedule_is_a_value_error():
    cfg = _compose("optim.scheduler.name=linear")
    with pytest.raises(ValueError, match="unknown optim.scheduler.name 'linear'; known: constant, cosine, plateau"):
        _loop.Schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg.optim.scheduler)


def test_cosine_schedule_values():
    cfg = _compose("optim.scheduler.name=cosine", "optim.scheduler.warmup_steps=4", "optim.scheduler.max_steps=12",
                   "optim.scheduler.eta_min=0.1", "optim.optimizer.lr=1.0")
    opt = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    sched = _loop.Schedule(opt, cfg.optim.scheduler)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.after_step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.55) and lrs[12:] == pytest.approx([0.1, 0.1])
