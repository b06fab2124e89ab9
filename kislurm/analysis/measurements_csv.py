"""A user's table of measurements (`kislurm fit MEASUREMENTS.csv`): results produced by other tools, read into
the same Measurement records the aggregator builds from stores, with one-line errors naming file, line and fix."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from kislurm.analysis.collapse import Measurement, token_key
from kislurm.errors import MeasurementError  # noqa: F401 (re-exported)


CSV_REQUIRED = ("params", "ratio", "retention")
CSV_OPTIONAL = ("tokens", "seed", "n_facts", "size", "n_choices", "exposures_per_fact", "knowledge_bits",
                "infused_retention", "role")
ROLES = ("fit", "validate")
_INTEGER = ("seed", "n_facts", "n_choices")


def _number(path: Path, line: int, col: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise MeasurementError(f"{path}:{line}: column '{col}' value {text!r} is not a number; "
                               "fix: write a plain number such as 0.5 or 1.3e8") from None
    if not math.isfinite(v):
        raise MeasurementError(f"{path}:{line}: column '{col}' value {text!r} is not finite; fix: write a number")
    if col in _INTEGER and v != int(v):
        raise MeasurementError(f"{path}:{line}: column '{col}' value {text!r} is not an integer; fix: write e.g. 3")
    return v


def _row(path: Path, line: int, row: dict[str, str]) -> dict:
    vals: dict = {}
    for col, text in row.items():
        text = (text or "").strip()
        if col == "size":
            vals[col] = text or None
        elif col == "role":
            if text.lower() not in ROLES + ("",):
                raise MeasurementError(f"{path}:{line}: column 'role' value {text!r} is neither 'fit' nor 'validate'; "
                                       "fix: write fit (enters the law) or validate (held out, compared with it)")
            vals[col] = text.lower() or "fit"
        elif text:
            vals[col] = _number(path, line, col, text)
        elif col in CSV_REQUIRED:
            raise MeasurementError(f"{path}:{line}: column '{col}' is empty; fix: give a value on every row")
    if not 0.0 < vals["ratio"] < 1.0:
        raise MeasurementError(f"{path}:{line}: column 'ratio' value {vals['ratio']:g} is outside (0, 1); "
                               "fix: write the infusion ratio as a fraction, e.g. 0.1 for 10%")
    if vals["params"] <= 0:
        raise MeasurementError(f"{path}:{line}: column 'params' value {vals['params']:g} is not positive; "
                               "fix: give the (non-embedding) parameter count, e.g. 1.3e8")
    for col in ("tokens", "n_facts", "n_choices", "exposures_per_fact", "knowledge_bits"):
        if col in vals and vals[col] <= 0:
            raise MeasurementError(f"{path}:{line}: column '{col}' value {vals[col]:g} is not positive; "
                                   "fix: give a positive value or leave the cell empty")
    return vals


def measurements_from_csv(path: str | Path) -> list[Measurement]:
    """The measurements of a table (see read_measurements_csv), whatever their role."""
    return read_measurements_csv(path)[0]


def read_measurements_csv(path: str | Path) -> tuple[list[Measurement], list[str]]:
    """Read a plain table: params, ratio, retention, and optionally tokens, seed, n_facts, size, n_choices,
    exposures_per_fact, knowledge_bits, infused_retention (other columns are ignored; lines starting with '#' are comments).

    Missing size: named after params. Missing tokens: nan (unknown). Missing seed: rows repeating a
    (size, tokens, ratio) are numbered 0, 1, ... as replicate seeds. There are no per-fact scores in a table, so
    the bootstrap is parametric: binomial with n_facts, else residual (the CollapseResult says which).

    Returns the measurements and the sizes whose rows have role 'validate' (held out of the law's fit; every row
    of a size must have the same role)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MeasurementError(f"{path}: cannot read ({e.strerror}); fix: check the path") from None
    lines = [(i + 1, s) for i, s in enumerate(text.splitlines()) if s.strip() and not s.lstrip().startswith("#")]
    if not lines:
        raise MeasurementError(f"{path}: no header and no rows; fix: first line 'params,ratio,retention', then data")
    dialect = csv.excel_tab if "\t" in lines[0][1] and "," not in lines[0][1] else csv.excel
    header = [h.strip().lower() for h in next(csv.reader([lines[0][1]], dialect))]
    for col in CSV_REQUIRED:
        if col not in header:
            raise MeasurementError(f"{path}:{lines[0][0]}: missing column '{col}' (header: {','.join(header)}); "
                                   f"fix: name columns {','.join(CSV_REQUIRED)} and optionally {','.join(CSV_OPTIONAL)}")
    if len(lines) < 2:
        raise MeasurementError(f"{path}: header but no rows; fix: add one row per finished cell")
    wanted = [i for i, h in enumerate(header) if h in CSV_REQUIRED + CSV_OPTIONAL]
    rows = []
    for (line, s), cells in zip(lines[1:], csv.reader([s for _, s in lines[1:]], dialect)):
        if len(cells) != len(header):
            raise MeasurementError(f"{path}:{line}: {len(cells)} values for {len(header)} columns; "
                                   "fix: one value per header column (leave optional ones empty)")
        rows.append((line, _row(path, line, {header[i]: cells[i] for i in wanted})))
    return _measurements(path, rows)


def _measurements(path: Path, rows: list[tuple[int, dict]]) -> tuple[list[Measurement], list[str]]:
    params_of: dict[str, tuple[float, int]] = {}
    role_of: dict[str, tuple[str, int]] = {}
    repeat: dict[tuple, int] = defaultdict(int)
    first_line: dict[tuple, int] = {}
    out = []
    for line, v in rows:
        size = v.get("size") or f"{v['params']:.4g}"
        seen = params_of.setdefault(size, (v["params"], line))
        if seen[0] != v["params"]:
            raise MeasurementError(f"{path}:{line}: size {size!r} has params {v['params']:g} here but {seen[0]:g} "
                                   f"on line {seen[1]}; fix: one parameter count per size")
        role = role_of.setdefault(size, (v.get("role", "fit"), line))
        if role[0] != v.get("role", "fit"):
            raise MeasurementError(f"{path}:{line}: size {size!r} has role {v.get('role', 'fit')!r} here but "
                                   f"{role[0]!r} on line {role[1]}; fix: a size is either fitted or validated, not both")
        tokens = v.get("tokens", math.nan)
        key = (size, token_key(tokens), v["ratio"])
        seed = int(v["seed"]) if "seed" in v else repeat[key]
        repeat[key] += 1
        if (key, seed) in first_line:
            raise MeasurementError(f"{path}:{line}: same size, tokens, ratio and seed as line "
                                   f"{first_line[key, seed]}; fix: give each replicate its own seed or drop the "
                                   "duplicate")
        first_line[key, seed] = line
        out.append(Measurement(
            size=size, params=v["params"], ratio=v["ratio"], tokens=tokens, seed=seed, retention=v["retention"],
            n_choices=int(v["n_choices"]) if "n_choices" in v else None,
            exposures_per_fact=v.get("exposures_per_fact"),
            n_facts=int(v["n_facts"]) if "n_facts" in v else None, knowledge_bits=v.get("knowledge_bits"),
            infused_retention=v.get("infused_retention")))
    return out, sorted(s for s, (r, _) in role_of.items() if r == "validate")
