"""The Hydra configs: every experiment composes, instantiates, and builds what its YAML says."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

import deq
from experiments.config import build, register_resolvers
from experiments.tasks import LanguageModeling

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
register_resolvers()

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# Full-size models: built on the meta device (no memory, no initialisation cost).
HUGE = {"ptb_trellisnet", "wt103_transformer", "wt103_transformer_upg", "wt103_transformer_small",
        "wt103_trellisnet"}


@pytest.fixture(scope="module", autouse=True)
def _hydra():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def _compose(*overrides: str):
    return compose("train", overrides=list(overrides))


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
    assert a.data._target_ == "experiments.tasks.CopyMemoryTask" and a.train.compare_explicit


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
    schedule = instantiate(cfg.schedule)  # a known schedule with valid options
    _check_fields(schedule, cfg.schedule)
    # The task is built from the data files at run time; here its constructor must accept the keys.
    task_args = inspect.signature(get_class(cfg.data._target_)).parameters
    assert set(_plain(cfg.data)) | {"rank", "world_size", "device"} == set(task_args)

    if name in HUGE:
        with torch.device("meta"):
            model = instantiate(cfg.model)
    else:
        model = instantiate(cfg.model)
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
    s = cfg.schedule
    assert (s._target_, s.warmup_steps, s.max_steps, cfg.optim.clip) == ("experiments.schedules.Cosine", 16000,
                                                                          300000, 0.25)
    # The 2021 DEQ-Transformer code: seed 1111, Anderson with m=6 (locuslab/deq).
    assert cfg.seed == 1111 and instantiate(cfg.solver) == deq.Anderson(m=6, lam=1e-4, beta=1.0)
    assert cfg.train.precision == "bf16"
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
    assert cfg.train.pretrain_steps > 0 and cfg.schedule._target_ == "experiments.schedules.Plateau"
    assert (cfg.schedule.factor, cfg.schedule.patience, cfg.schedule.min_lr) == (0.25, 10, 0.02)


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


def test_unknown_schedule_is_a_composition_error():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="schedule"):
        _compose("schedule=linear")


def test_wikitext2_config_reads_the_wikitext2_files(tmp_path):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(" = Valkyria Chronicles = \n" * 400)
    cfg = _compose("data=wikitext2", f"data.root={tmp_path}")
    assert cfg.data.name == "wikitext-2" and cfg.data.vocab_size == 33278
    with pytest.raises(ValueError, match="data.vocab_size=33278 but the wikitext-2 corpus .* has 4 words"):
        build(cfg.data)
    task = instantiate(cfg.data, vocab_size=4)
    assert isinstance(task, LanguageModeling) and task.eval_splits == ("valid", "test")
