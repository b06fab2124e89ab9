"""The package's layout is the pipeline: each stage is a subpackage, and no stage imports from a later one.

Every module of kislurm is parsed with `ast`; every import counts, also a lazy one inside a function. kislurm's own
top-level helpers (paths, errors, publish) come before every stage; the package itself (`kislurm`, for __version__ and
its re-exports) may be imported from anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kislurm"
STAGES = ("common", "plan", "data", "train", "retention", "cluster", "analysis", "cli")
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
