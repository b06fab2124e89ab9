"""YAML -> config dataclasses: read an experiment file, apply overrides, resolve paths and preset bases, convert
every value to its annotated type and build the checked ExperimentConfig (and back: config_to_dict).

Keys are checked where they are set: an unknown key is refused with the list of valid ones, a value of the wrong
type names what was expected. Every error is one line that names the file, the key and the fix (ConfigError).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from kislurm.errors import ConfigError, KislurmError
from kislurm.plan.config import ExperimentConfig
from kislurm.plan.fields import FieldError, check
from kislurm.plan.presets import BUILTIN_PRESETS, ModelPreset, extend_presets


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return {list: "a list", dict: "a mapping"}[origin]
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert one YAML value to the annotated type, or raise FieldError naming what was expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        errors = []
        for a in inner:  # the first alternative that takes the value
            try:
                return _convert(a, value, key)
            except FieldError as e:
                errors.append((a, e))
        for a, e in errors:  # a list with a bad item: that item's error, not the list's
            if isinstance(value, list) and typing.get_origin(a) is list:
                raise e
        raise FieldError(key, f"expected {' or '.join(_type_name(a) for a in inner)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise FieldError(key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise FieldError(key, f"expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(key, f"expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            value = int(value)  # YAML reads 1e9 as a float
        if isinstance(value, str):
            value = _parse_count(value, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 3e-3 as a string
            except ValueError:
                raise FieldError(key, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FieldError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise FieldError(key, f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp}")  # a bug in this module, not in the user's file


_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def _parse_count(text: str, key: str) -> int:
    """Accept counts written like 2M, 100B or 1e9 for token budgets."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMbBgGtT]?)\s*", text)
    try:
        assert m is not None
        return int(round(float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1)))
    except (AssertionError, ValueError):
        raise FieldError(key, f"expected an integer (e.g. 2000000, 2M or 100B), got {text!r}") from None


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and checking each value."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FieldError(where, f"expected a mapping of {cls.__name__} settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    if cls is ModelPreset and data.get("init_from") is not None:
        data = _with_base_architecture(data, prefix)
    for key in data:
        if key not in names:
            models = cls is ModelPreset and where.startswith("models.")  # base: was resolved before
            valid = [*names, "base"] if models else names
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise FieldError(f"{prefix}{key}", f"unknown key{hint}; valid keys here: {', '.join(valid)}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise FieldError(f"{prefix}{e.key}", str(e)) from None
    except TypeError as e:  # a required field is missing
        missing = re.findall(r"'(\w+)'", str(e))
        raise FieldError(f"{prefix}{missing[0] if missing else '?'}", f"required key is missing ({e})") from None


def build_section(cls: type, data: Any, where: str) -> Any:
    """A config dataclass from its plain-data form (config_to_dict's output, or YAML), checked as a config file is:
    a bad key or value raises ConfigError naming `where`."""
    try:
        return _build(cls, data, where)
    except FieldError as e:  # e.key starts with `where`
        raise ConfigError(f"{e.key}: {e}") from None


def _with_base_architecture(data: dict, prefix: str) -> dict:
    """A preset with init_from: its architecture fields read from the base's config.json (kislurm.plan.hf)."""
    from kislurm.plan import hf  # imports torch: only when a preset starts from a base model

    check(isinstance(data["init_from"], str), f"{prefix}init_from", "expected the path of a HuggingFace folder")
    seq = data.get("seq_length")
    try:
        fields = hf.base_preset_fields(data["init_from"], seq if isinstance(seq, int) else None)
    except KislurmError as e:
        raise FieldError(f"{prefix}init_from", str(e)) from None
    differ = [k for k in hf.ARCH_FIELDS if k in data and data[k] != fields[k]]  # a run's config.yaml repeats them
    check(not differ, f"{prefix}{differ[0] if differ else ''}", "init_from takes the architecture from the base's "
          f"config.json, which gives {', '.join(f'{k} {fields[k]}' for k in differ)}; fix: remove "
          f"{', '.join(differ)} from this preset")
    return {**data, **fields}


def _resolve_paths(data: dict, base: Path) -> dict:
    """Make file paths in the data section relative to the config file, so a run works from any directory."""
    section = data.get("data")
    if isinstance(section, dict):
        for key in ("knowledge_triplets", "general_triplets", "templates_file", "tokenizer", "general_probes",
                    "general_census"):
            if isinstance(section.get(key), str):
                section[key] = str((base / Path(section[key]).expanduser()).resolve())
        corpus = section.get("general_corpus")
        if isinstance(corpus, dict) and isinstance(corpus.get("files"), list):
            corpus["files"] = [str(base / Path(f).expanduser()) if isinstance(f, str) else f for f in corpus["files"]]
    models = data.get("models")
    for preset in models.values() if isinstance(models, dict) else []:
        if isinstance(preset, dict) and isinstance(preset.get("init_from"), str):
            preset["init_from"] = str((base / Path(preset["init_from"]).expanduser()).resolve())
    data["output_root"] = str(Path(data.get("output_root", "runs")).expanduser().resolve())  # relative to cwd
    return data


def config_from_dict(data: Any, source: str = "<config>", base: Path | None = None) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from a plain mapping (as read from YAML)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}; "
                          "fix: start the file with keys such as name:, grid:, data:")
    data = _resolve_paths(json.loads(json.dumps(data)), base or Path.cwd())
    try:
        return _base_tokenizer(_build(ExperimentConfig, _with_preset_bases(data), ""))
    except FieldError as e:
        raise ConfigError(f"{source}: {e.key}: {e}") from None


def _with_preset_bases(data: dict) -> dict:
    """The models: section with every `base:` resolved into the fields it inherits (presets.extend_presets)."""
    models = data.get("models")
    if isinstance(models, dict):
        data["models"] = extend_presets(models, BUILTIN_PRESETS, "models")
    return data


def _base_tokenizer(cfg: ExperimentConfig) -> ExperimentConfig:
    """With init_from sizes in the grid, data.tokenizer defaults to the base's tokenizer.json (one base tokenizer
    per run); whether a given data.tokenizer is the base's is checked by the data stage (it reads both files)."""
    bases = sorted({cfg.presets[s].init_from for s in cfg.grid.sizes if cfg.presets[s].init_from is not None})
    if not bases or cfg.data.tokenizer is not None:
        return cfg
    check(len(bases) == 1, "data.tokenizer", f"the grid starts from {len(bases)} bases ({', '.join(bases)}): "
          "one run has one tokenizer; fix: set data.tokenizer to the one they share, or one base per run")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(Path(bases[0]) /
                                                                                     "tokenizer.json")))


def read_yaml(path: str | Path, error: type[KislurmError], what: str, fix_missing: str) -> Any:
    """A YAML file's content (safe loader), or `error` in one line: the file missing (with `fix_missing`), or
    malformed, at which line and column. Every YAML input (experiment files, templates) is read here."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found; fix: {fix_missing}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{path}: malformed YAML{where}: {problem}; fix: check indentation and quoting") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (safe loader), apply dotted-key overrides, validate."""
    path = Path(path)
    data = read_yaml(path, ConfigError, "config file", "check the path (try configs/demo.yaml)")
    for dotted, value in (overrides or {}).items():
        data = data or {}
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(data, str(path), path.parent.resolve())


def config_to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (for JSON records and hashing)."""
    return dataclasses.asdict(cfg)
