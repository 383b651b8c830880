"""The documentation's code runs: every Python block of the guide, and the worked example.

The Sphinx build itself (warnings as errors) runs in ``.ci/run``; these tests
keep the code shown on the pages from rotting.
"""

import importlib.util
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(rst: Path) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of ``rst``, dedented, in order."""
    lines = rst.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if re.match(r"\s*\.\. code-block:: python\s*$", lines[i]):
            indent = len(lines[i]) - len(lines[i].lstrip()) + 3
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) >= indent):
                body.append(lines[i][indent:])
                i += 1
            blocks.append("\n".join(body).strip("\n"))
        else:
            i += 1
    return blocks


def test_python_blocks_finds_the_blocks_and_their_code():
    blocks = python_blocks(DOCS / "guide.rst")
    assert len(blocks) >= 8
    assert blocks[0].startswith("import torch")
    assert all(block and not block.startswith(" ") for block in blocks)


def test_guide_code_blocks_run_in_order(capsys):
    namespace: dict = {}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a guide example that does not converge fails
        for number, block in enumerate(python_blocks(DOCS / "guide.rst")):
            exec(compile(block, f"guide.rst block {number}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "SolverResult(" in out
    assert namespace["res"].rows < namespace["res"].n_iter * 256  # compact=True saved rows
    assert bool(namespace["layer"].last_result.converged.all())


def _load_example(monkeypatch):
    name = "deq_docs_digits_deq"
    spec = importlib.util.spec_from_file_location(name, DOCS / "examples" / "digits_deq.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_worked_example_trains_in_quick_mode(capsys, monkeypatch):
    pytest.importorskip("sklearn")
    metrics = _load_example(monkeypatch).main(["--quick"])
    out = capsys.readouterr().out
    assert "test acc" in out and "spectral radius" in out
    assert metrics["test_acc"] > 0.4  # 10 classes: chance is 0.1; 0.74 measured after two quick epochs
    assert metrics["converged_frac"] >= 0.9
    assert 0.0 < metrics["rho_max"] < 1.5
