"""Sphinx configuration of deq's documentation.

Build (offline, warnings as errors, from the repository root)::

    python -m sphinx -E -W --keep-going -b html docs docs/_build/html

``nitpicky`` is on, so a reference to an object that is not documented is a
warning, hence an error under ``-W``. Set ``DEQ_DOCS_INTERSPHINX=1`` to link
PyTorch/NumPy/Python names to their own documentation (that fetches inventories
from the network, so it is off by default and never used in CI).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deq  # noqa: E402  (after the path is set)

project = "deq"
author = "the deq authors"
copyright = "the deq authors, MIT License"
release = version = deq.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
nitpicky = True
default_role = "code"  # `x` in prose is code, as ``x`` is, not an unresolved reference
highlight_language = "none"  # docstring "::" blocks hold plain-text equations; code blocks name their language

# Google-style docstrings. ``Attributes:`` become attribute entries, so that
# :attr:`nstep` and the like have a target.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = False
napoleon_use_rtype = False  # "Returns: X: more" reads as prose, not as a return type "X"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True

# Names outside deq that signatures and docstrings mention. Without intersphinx
# they have no target; they are rendered as code instead of failing the build.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|nn|F|typing|collections\.abc|pathlib|os|re|argparse|dataclasses|enum)(\..*)?"),
    (r"py:.*", r"deq\._registry\.T"),
    (r"py:.*", r"(Tensor|Generator|Module|Parameter|Path|PathLike|Pattern|Match|Iterator|Iterable|Sequence|Mapping|"
               r"Callable|Any|NamedTuple|ClassVar|Union|Optional|ndarray|dtype|device|Size)"),
]

html_theme = "alabaster"
html_theme_options = {"page_width": "1360px", "sidebar_width": "240px", "body_max_width": "none", "fixed_sidebar": True}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
html_static_path: list[str] = []
html_show_sourcelink = False

# MathJax renders the equations in the browser, loaded from its CDN when a page
# is viewed (the build itself needs no network). To read the pages offline,
# point DEQ_DOCS_MATHJAX at a local copy, e.g.
# file:///path/to/node_modules/mathjax/tex-mml-chtml.js (npm package mathjax).
if os.environ.get("DEQ_DOCS_MATHJAX"):
    mathjax_path = os.environ["DEQ_DOCS_MATHJAX"]

if os.environ.get("DEQ_DOCS_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable", None),
        "numpy": ("https://numpy.org/doc/stable", None),
    }


# ---------------------------------------------------------------------------
# Cross-references by object identity.
#
# A docstring names objects as its own module sees them (``select_rows`` in
# deq/layer.py, ``Solver`` in deq/solvers/base.py), while this reference lists
# each object once, under the name users import it by (``deq.solve``, not
# ``deq.solvers.base.solve``). When Sphinx finds no target for a name, this
# resolves the name in the module the docstring was written in (and in the
# page's current module), imports it, and links to the documented entry that is
# the same Python object. A name that resolves to nothing documented stays a
# warning, so a broken reference still fails the build.

import importlib  # noqa: E402
import re  # noqa: E402

from sphinx.util.nodes import make_refnode  # noqa: E402

_MISSING = object()


def _lookup(dotted: str):
    """The object at ``dotted`` (``pkg.mod.Class.attr``), or ``_MISSING``."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def _scopes(node) -> list[str]:
    """Where a short name in this node's text may live, innermost first."""
    scopes = []
    source = node.source or ""
    if "docstring of " in source:  # autodoc: "path.py:docstring of pkg.mod.Class.meth"
        owner = source.split("docstring of ", 1)[1].split(":")[0].split(".")
        scopes += [".".join(owner[:cut]) for cut in range(len(owner), 0, -1)]
    module, cls = node.get("py:module"), node.get("py:class")
    if module and cls:
        scopes.append(f"{module}.{cls}")
    if module:
        scopes.append(module)
    return scopes


def _documented(app, env) -> dict[int, str]:
    """id(object) -> the name it is documented under.

    Built once per process, at the first lookup (cross-references are resolved
    after every page has been read), and kept on ``app``, not on the pickled
    ``env``: object ids mean nothing in the next build's process.
    """
    cache = getattr(app, "_deq_documented", None)
    if cache is None:
        cache = {}
        for name, entry in env.get_domain("py").objects.items():
            if entry.aliased:
                continue
            obj = _lookup(name)
            if obj is not _MISSING and not isinstance(obj, (int, float, str, bool, type(None))):
                cache.setdefault(id(obj), name)
        app._deq_documented = cache
    return cache


def _resolve_by_identity(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    for scope in _scopes(node) + [""]:
        obj = _lookup(f"{scope}.{target}" if scope else target)
        if obj is _MISSING:
            continue
        name = _documented(app, env).get(id(obj))
        if name is None:
            continue
        entry = env.get_domain("py").objects[name]
        return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)
    return None


_PRIVATE_PARAM = re.compile(r",\s*_\w+(?:\s*:\s*[^=,()]+)?\s*=\s*[^,()]+(?=[,)])")


def _hide_private_fields(app, what, name, obj, options, signature, return_annotation):
    """Drop ``_name=...`` parameters from class signatures: dataclass fields the
    library sets itself (``Anderson._prefix`` for causal mode), not options.
    Private classes shown for their docstring (``_CausalLoop``) get no signature."""
    if what == "class" and name.rsplit(".", 1)[-1].startswith("_"):
        return "", None
    if what == "class" and signature:
        signature = _PRIVATE_PARAM.sub("", signature)
    return signature, return_annotation


def setup(app):
    app.connect("missing-reference", _resolve_by_identity)
    app.connect("autodoc-process-signature", _hide_private_fields)
