"""The package's layout is the pipeline: each stage is a subpackage, no stage imports from a later one, no two
modules import each other (even through others), and no module reaches into another's private names.

Every module of kislurm is parsed with `ast`; every import counts, also a lazy one inside a function (imports under
`if TYPE_CHECKING:` do not run, so they do not count for cycles). kislurm's own top-level helpers (paths, errors,
publish) come before every stage; the package itself (`kislurm`, for __version__ and its re-exports) may be imported
from anywhere. Third-party internals are used only in train/cpu_shims.py and train/workarounds.py, behind public
functions, so that an upgrade of megatron-core, torch or submitit has two files to read.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kislurm"
INTERNALS_ALLOWED = {"kislurm.train.cpu_shims", "kislurm.train.workarounds"}
"""The two modules that may touch third-party internals (each behind a public function of its own)."""
PUBLIC_DESPITE_UNDERSCORE = {"os._exit"}
"""Documented public APIs whose names start with an underscore."""
STAGES = ("common", "plan", "data", "train", "retention", "cluster", "analysis", "orchestrate", "cli")
COMMON = {"kislurm.paths", "kislurm.errors", "kislurm.publish"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str | None:
    """The stage of a kislurm module (None: the package itself, importable from anywhere)."""
    if module == "kislurm":
        return None
    if module in COMMON:
        return "common"
    if module == "kislurm.cli":
        return "cli"
    sub = module.split(".")[1]
    assert sub in STAGES, f"{module}: not in a stage subpackage; put it in one of {STAGES[1:-1]} or in COMMON"
    return sub


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, kislurm module) for every import in `source`, top-level or lazy; `from X import name` counts as
    X.name when that is a module."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((node.lineno, full if full in known else base))
    return [(line, m) for line, m in out if m == "kislurm" or m.startswith("kislurm.")]


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def violations(module: str, source: str, is_package: bool, known: set[str]) -> list[str]:
    mine = stage_of(module)
    if mine is None:
        return []
    bad = []
    for line, other in imported_modules(source, module, is_package, known):
        theirs = stage_of(other)
        if theirs is not None and STAGES.index(theirs) > STAGES.index(mine):
            bad.append(f"{module}:{line} ({mine}) imports {other} ({theirs})")
    return bad


def test_no_stage_imports_from_a_later_stage():
    modules = all_modules()
    bad = [v for name, path in modules.items()
           for v in violations(name, path.read_text(), path.name == "__init__.py", set(modules))]
    assert not bad, "imports against the pipeline's direction:\n" + "\n".join(bad)


def test_every_stage_is_a_subpackage_and_every_module_has_a_stage():
    modules = all_modules()
    for stage in STAGES[1:-1]:
        assert f"kislurm.{stage}" in modules, stage
    assert {stage_of(m) for m in modules} == set(STAGES) | {None}


def test_the_check_sees_lazy_and_relative_imports_against_the_direction():
    known = set(all_modules())
    lazy = "def f():\n    from kislurm.analysis import report\n"
    relative = "from ..cluster.submit import describe\n"
    assert violations("kislurm.train.trainer", lazy, False, known) == [
        "kislurm.train.trainer:2 (train) imports kislurm.analysis.report (analysis)"]
    assert violations("kislurm.data.prepare", relative, False, known) == [
        "kislurm.data.prepare:1 (data) imports kislurm.cluster.submit (cluster)"]
    assert violations("kislurm.cluster.submit", "from kislurm.train import checkpoint\nimport kislurm\n", False,
                      known) == []


# ------------------------------------------------------------------------------------- cycles and private names
def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks: imports there never run."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for n in ast.walk(node) if hasattr(n, "lineno")}
    return lines


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """module -> the kislurm modules it imports at run time (lazy imports included, TYPE_CHECKING ones not);
    `sources` maps a module name to (its source, whether it is a package's __init__)."""
    known = set(sources)
    graph = {}
    for module, (source, is_package) in sources.items():
        skip = _type_checking_lines(ast.parse(source))
        graph[module] = {m for line, m in imported_modules(source, module, is_package, known)
                         if line not in skip and m in known and m != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (scipy's csgraph finds them)."""
    names = sorted(graph)
    index = {m: i for i, m in enumerate(names)}
    rows = [index[a] for a in names for b in graph[a]]
    cols = [index[b] for a in names for b in graph[a]]
    adjacency = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, label = connected_components(adjacency, directed=True, connection="strong")
    groups: dict[int, list[str]] = {}
    for m, g in zip(names, label):
        groups.setdefault(int(g), []).append(m)
    return sorted(g for g in groups.values() if len(g) > 1)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _absolute(node: ast.ImportFrom, own: str, is_package: bool) -> str:
    """The module a `from ... import` names, relative ones resolved against the importing module."""
    if not node.level:
        return node.module or ""
    here = own.split(".") if is_package else own.split(".")[:-1]
    return ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))


def private_uses(source: str, own: str = "", is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted name) for every use of another module's private name: `from M import _x`, or `M._x` / `M.a._x`
    on an imported module M (relative imports resolved)."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the dotted thing it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, own, is_package)
            for a in node.names:
                if _is_private(a.name) and base != own:
                    yield node.lineno, f"{base}.{a.name}"
                bound[a.asname or a.name] = f"{base}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                dotted = bound[root.id] + ast.unparse(node)[len(root.id):]
                if dotted.rsplit(".", 1)[0] != own:
                    yield node.lineno, dotted


def _violating(uses: Iterator[tuple[int, str]], internals_ok: bool) -> list[tuple[int, str]]:
    """The uses that break the rule: any, or with `internals_ok` (cpu_shims, workarounds) only kislurm's own."""
    return [(line, name) for line, name in uses if name not in PUBLIC_DESPITE_UNDERSCORE
            and not (internals_ok and not name.startswith("kislurm."))]


def _package_sources() -> dict[str, tuple[str, bool]]:
    return {name: (path.read_text(), path.name == "__init__.py") for name, path in all_modules().items()}


def test_no_import_cycle_between_kislurm_modules():
    found = cycles(import_graph(_package_sources()))
    assert not found, ("import cycles (lazy imports count; move what both sides need to a module of its own):\n"
                       + "\n".join(" <-> ".join(c) for c in found))


def test_no_module_reaches_into_another_modules_private_names():
    bad = [f"{name}:{line} uses {used}" for name, path in all_modules().items()
           for line, used in _violating(private_uses(path.read_text(), name, path.name == "__init__.py"),
                                        name in INTERNALS_ALLOWED)]
    assert not bad, ("private names used across modules (make a public name; third-party internals go behind a "
                     "public function in train/workarounds.py):\n" + "\n".join(bad))


def test_tools_and_jobs_use_only_public_kislurm_names():
    scripts = sorted((REPO / "tools").rglob("*.py")) + sorted((REPO / "jobs").rglob("*.py"))
    assert scripts, "tools/ has no Python scripts?"
    bad = [f"{p.relative_to(REPO)}:{line} uses {used}" for p in scripts
           for line, used in private_uses(p.read_text()) if used.startswith("kislurm.")]
    assert not bad, "scripts reaching into kislurm's private names (give them a public name):\n" + "\n".join(bad)


SYNTHETIC = {
    "kislurm.data.a": ("from kislurm.data import b\n", False),
    "kislurm.data.b": ("def later():\n    from kislurm.data.c import build\n", False),
    "kislurm.data.c": ("def build():\n    from kislurm.data.a import thing\n", False),
    "kislurm.data.d": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kislurm.data.e import T\n",
                       False),
    "kislurm.data.e": ("from kislurm.data import d\n", False),
}


def test_the_cycle_check_fails_on_a_cycle_made_on_purpose_and_ignores_type_checking_imports():
    assert cycles(import_graph(SYNTHETIC)) == [["kislurm.data.a", "kislurm.data.b", "kislurm.data.c"]]
    acyclic = {**SYNTHETIC, "kislurm.data.c": ("def build():\n    return 1\n", False)}
    assert cycles(import_graph(acyclic)) == []


@pytest.mark.parametrize("source, internals_ok, expected", [
    ("from kislurm.data.prepare import _sentences\n", False, ["kislurm.data.prepare._sentences"]),
    ("from kislurm.data import prepare\nprepare._write_stream()\n", False, ["kislurm.data.prepare._write_stream"]),
    ("import kislurm.data.prepare as p\np._usage\n", False, ["kislurm.data.prepare._usage"]),
    ("from . import streams\nstreams._passes\n", False, ["kislurm.data.streams._passes"]),
    ("from .prepare import _summary\n", False, ["kislurm.data.prepare._summary"]),
    ("import torch\ntorch._foreach_norm([])\n", False, ["torch._foreach_norm"]),
    ("import torch\ntorch._foreach_norm([])\n", True, []),
    ("from kislurm.data.prepare import _sentences\n", True, ["kislurm.data.prepare._sentences"]),
    ("import os\nos._exit(0)\nself._own = 1\n_mine = 2\n", False, []),
])
def test_the_private_name_check_sees_imports_and_module_attributes(source, internals_ok, expected):
    uses = _violating(private_uses(source, "kislurm.data.mixes"), internals_ok)
    assert [name for _, name in uses] == expected


MAX_LINES = 600
"""A module longer than this says in its docstring why it is one module ("Why one long module: ...")."""


def test_a_module_over_600_lines_says_why_in_its_docstring():
    long = {name: len(path.read_text().splitlines()) for name, path in all_modules().items()
            if len(path.read_text().splitlines()) > MAX_LINES}
    silent = [f"{name} ({lines} lines)" for name, lines in long.items()
              if "why one long module" not in (ast.get_docstring(ast.parse(all_modules()[name].read_text())) or "").lower()]
    assert not silent, (f"modules over {MAX_LINES} lines without a 'Why one long module: ...' paragraph in their "
                        "docstring (split them, or say why not):\n" + "\n".join(silent))
