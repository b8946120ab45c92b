"""Sphinx configuration of the pyro_fdiv site (``make docs``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyro_fdiv

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "pyro_fdiv"
author = "pyro_fdiv developers"
copyright = "2026, pyro_fdiv developers"
release = pyro_fdiv.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "experiments/**", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"pyro_fdiv {release}"

# every cross-reference must resolve (with -W, a dangling one fails the build)
nitpicky = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
typehints_use_signature = False
always_document_param_types = False

# -- intersphinx, offline ---------------------------------------------------------------------
# The inventories live in docs/_inventories (``make docs-inventories`` fetches them where there
# is a network). The build never downloads: a missing inventory is left out, and references
# into that project render as plain text instead of failing the nitpicky build.
INVENTORIES = {
    "python": ("https://docs.python.org/3", "python.inv"),
    "torch": ("https://docs.pytorch.org/docs/stable", "torch.inv"),
    "pyro": ("https://docs.pyro.ai/en/stable", "pyro.inv"),
    "numpy": ("https://numpy.org/doc/stable", "numpy.inv"),
    "pandas": ("https://pandas.pydata.org/docs", "pandas.inv"),
    "arviz": ("https://python.arviz.org/en/stable", "arviz.inv"),
}
intersphinx_mapping = {}
nitpick_ignore_regex = []
# the top-level names of each project, for the plain-text fallback
PREFIXES = {
    "python": r"(builtins\.)?(int|float|str|bool|bytes|dict|list|tuple|set|object|type|None"
    r"|Exception|ValueError|TypeError|RuntimeError|NotImplementedError|UserWarning"
    r"|Warning|os\..*|pathlib\..*|collections\..*|typing\..*|dataclasses\..*"
    r"|argparse\..*|contextlib\..*|enum\..*|functools\..*|abc\..*)",
    "torch": r"torch(\..*)?",
    "pyro": r"pyro(\..*)?",
    "numpy": r"(numpy|np)(\..*)?",
    "pandas": r"(pandas|pd)(\..*)?",
    "arviz": r"(arviz|az)(\..*)?",
}
for _name, (_url, _file) in INVENTORIES.items():
    _path = DOCS / "_inventories" / _file
    if _path.is_file():
        intersphinx_mapping[_name] = (_url, str(_path))
    else:
        nitpick_ignore_regex.append((r"py:.*", PREFIXES[_name]))
intersphinx_disabled_reftypes = ["*"]
intersphinx_timeout = 1
# names third-party annotations expand to, with no page of their own in any inventory
nitpick_ignore_regex += [
    (r"py:.*", r"(collections\.abc|typing|typing_extensions)\..*"),
    (r"py:.*", r"(numpy\.typing|numpy\._typing)\..*"),
    (r"py:.*", r"torch\.(nn\.modules|_tensor|serialization|types|utils\.hooks)\..*"),
    (r"py:.*", r"pyro\.(poutine\.(runtime|trace_struct|messenger)|infer\.elbo)\..*"),
    (r"py:.*", r"(xarray|matplotlib|scipy|tqdm)(\..*)?"),
    (r"py:.*", r"Tensor|Module|Path|Sequence|Callable|Iterable|Mapping|Any|NamedTuple"),
    (r"py:.*", r"\.\.\.|Ellipsis|_?[A-Z]\b|T|callable"),
    # type aliases and TypeVars of the annotations, and Pyro internals they expand to
    (r"py:.*", r"pyro_fdiv\.inference\.(particles\.Weights|inner\.T)"),
    (r"py:.*", r"_DependentProperty|ExpandedDistribution"),
]

# -- notebooks ---------------------------------------------------------------------------------
# Executed on every build with the smoke budget unless the caller sets PYRO_FDIV_SMOKE=0.
os.environ.setdefault("PYRO_FDIV_SMOKE", "1")
nb_execution_mode = "force"
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True


# -- the CLI's help, generated at build time ---------------------------------------------------
def _write_cli_help() -> None:
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    for command in ["", "demo", "eight-schools", "train"]:
        args = [sys.executable, "-m", "pyro_fdiv.cli", *([command] if command else []), "--help"]
        env = {**os.environ, "COLUMNS": "96"}
        text = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
        (out / f"cli_{command or 'main'}.txt").write_text(text)


_write_cli_help()


# -- the table of f-divergences, from the classes' docstrings ---------------------------------
def _write_divergence_table() -> None:
    import inspect
    import re

    from pyro_fdiv import divergences

    names: dict[type, list[str]] = {}
    for name in divergences.available_divergences():
        names.setdefault(divergences._REGISTRY[name], []).append(name)
    rows = []
    for cls, aliases in names.items():
        doc = inspect.getdoc(cls) or ""
        summary = re.sub(r"\s*\[\d+\]", "", doc.split("\n\n")[0].replace("\n", " "))
        if not summary.endswith("."):  # a sentence that continues in the math block
            summary = summary.rsplit(",", 1)[0] + "."
        math = doc.split(".. math::", 1)[1].split("\n\n")[1] if ".. math::" in doc else ""
        instance = cls(0.5) if cls is divergences.AmariAlpha else cls()
        dual = type(instance.dual())
        dual_name = "itself" if dual is cls else f":class:`~pyro_fdiv.divergences.{dual.__name__}`"
        if cls is divergences.AmariAlpha:
            dual_name = "Amari α with :math:`1 - \\alpha`"
        rows.append(
            [
                f":class:`~pyro_fdiv.divergences.{cls.__name__}` ("
                + ", ".join(f"``{a}``" for a in aliases)
                + ")",
                summary,
                f":math:`{' '.join(math.split())}`" if math else "see the class",
                dual_name,
            ]
        )
    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 20 30 40 10",
        "",
        "   * - class (registry names)",
        "     - divergence",
        "     - generator :math:`f`, derivative, conjugate :math:`f^*`, critic activation "
        ":math:`g_f`",
        "     - dual :math:`\\tilde f`",
    ]
    for row in rows:
        lines.append(f"   * - {row[0]}")
        lines += [f"     - {cell}" for cell in row[1:]]
    out = DOCS / "_generated" / "divergence_table.rst"
    out.write_text("\n".join(lines) + "\n")


_write_divergence_table()


# -- references resolved through the import system -----------------------------------------
# Docstrings name things as Python does: ``pyro_fdiv.inference.IWAE`` (a re-export, documented
# where it is defined), ``:meth:`loss``` inside a subclass (inherited), ``VAE.gaussian_proposal``
# (imported into the module). Resolve such a target by importing it and looking up the object's
# defining module and class. A target that exists but has no entry of its own (a private
# helper, or a method inherited from torch or Pyro without an inventory) renders as plain
# text; a target that does not exist stays a warning (an error under -W).
def _lookup(dotted):
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        owner, names = obj, []
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return None
            owner, obj = obj, getattr(obj, attr)
            names.append(attr)
        return owner, obj, names
    return None


def _real_names(owner, obj, names):
    import inspect

    qual = getattr(obj, "__qualname__", None)
    module = getattr(obj, "__module__", None)
    if module and qual and (inspect.isclass(obj) or inspect.isroutine(obj)):
        yield f"{module}.{qual}"
    attr = names[-1] if names else None
    if attr is None:
        return
    if inspect.ismodule(owner):
        yield f"{owner.__name__}.{attr}"
    elif inspect.isclass(owner):
        for base in owner.__mro__:
            if attr in vars(base):
                yield f"{base.__module__}.{base.__qualname__}.{attr}"
                break


def _resolve_python(app, env, node, contnode):
    from sphinx.util.nodes import make_refnode

    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip("~.")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module and cls:
        candidates.append(f"{module}.{cls}.{target}")
    if module:
        candidates.append(f"{module}.{target}")
    objects = env.get_domain("py").objects
    for candidate in candidates:
        found = _lookup(candidate)
        if found is None:
            continue
        for real in _real_names(*found):
            entry = objects.get(real)
            if entry is not None:
                return make_refnode(
                    app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, real
                )
        return contnode
    return None


# every name in a module's __all__ is documented, with or without a docstring (automodule
# only offers the names of the module's __all__ to this hook)
def _keep_public(app, what, name, obj, skip, options):
    return False if what == "module" and not name.startswith("_") else None


def setup(app):
    app.connect("missing-reference", _resolve_python)
    app.connect("autodoc-skip-member", _keep_public)
