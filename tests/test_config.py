"""Experiment config: defaults, overrides, and one exact one-line message per kind of bad input."""

import dataclasses
from pathlib import Path

import pytest

from kislurm.plan.config import ConfigError, ExperimentConfig
from kislurm.plan.loader import config_from_dict, load_config
from kislurm.plan.presets import BUILTIN_PRESETS
from kislurm.plan.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message.split(": ", 1)[1]  # drop the file path


def test_defaults_load_and_yaml_overrides_only_what_differs(tmp_path):
    cfg = load_config(write(tmp_path, "name: x\ngrid: {ratios: [0.2, 0.4]}\n"))
    assert cfg.grid.ratios == [0.2, 0.4]
    assert cfg.grid.sizes == ["cpu-s", "cpu-l"]  # default kept
    assert cfg.train.lr == 3e-3
    assert Path(cfg.output_root) == Path.cwd() / "runs"


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(path).grid.sizes, path


def test_counts_with_suffixes_and_float_notation(tmp_path):
    cfg = load_config(write(tmp_path, "grid: {token_budgets: [2M, 1e9, 100B, 5000]}\ntrain: {lr: 3e-4}\n"))
    assert cfg.grid.token_budgets == [2_000_000, 1_000_000_000, 100_000_000_000, 5000]
    assert cfg.train.lr == 3e-4


def test_custom_model_preset(tmp_path):
    cfg = load_config(write(tmp_path, "models: {tiny: {num_layers: 1, hidden_size: 8, num_attention_heads: 2}}\n"
                                      "grid: {sizes: [tiny]}\n"))
    assert cfg.presets["tiny"].ffn == 32


def keys(cls: type) -> str:
    """The valid keys a refusal lists: the dataclass's fields in their declared order."""
    return ", ".join(f.name for f in dataclasses.fields(cls))


BAD = [
    ("unknown top-level key", "grdi: {}\n",
     f"grdi: unknown key (did you mean grid?); valid keys here: {keys(ExperimentConfig)}"),
    ("unknown nested key", "train: {learning_rate: 0.1}\n",
     f"train.learning_rate: unknown key; valid keys here: {keys(TrainConfig)}"),
    ("ratio out of range", "grid: {ratios: [0.1, 1.5]}\n",
     "grid.ratios[1]: expected a ratio strictly between 0 and 1, got 1.5; fix: write fractions, e.g. 0.1 for 10%"),
    ("ratio not a number", "grid: {ratios: [0.1, lots]}\n", "grid.ratios[1]: expected a number, got 'lots'"),
    ("unknown preset", "grid: {sizes: [cpu-s, 13B]}\n",
     "grid.sizes[1]: unknown model preset '13B'; fix: use one of " + str(sorted(BUILTIN_PRESETS))
     + " or define it under models:"),
    ("TP does not divide heads", "models: {odd: {num_layers: 1, hidden_size: 24, num_attention_heads: 3, "
     "tensor_parallel: 2}}\n",
     "models.odd.tensor_parallel: tensor_parallel 2 does not divide num_attention_heads 3; fix: choose a TP degree "
     "that divides the head count"),
    ("missing required preset key", "models: {odd: {num_layers: 1, hidden_size: 24}}\n",
     "models.odd.num_attention_heads: required key is missing"),
    ("bad executor choice", "executor: {cluster: kubernetes}\n",
     "executor.cluster: expected one of 'local', 'slurm', 'debug', got 'kubernetes'"),
    ("bad Slurm time", "executor: {time: 90min}\n",
     "executor.time: '90min' is not a Slurm time; fix: use MM, HH:MM:SS or D-HH:MM:SS, e.g. 12:00:00"),
    ("wrong section type", "grid: [0.1, 0.2]\n", "grid: expected a mapping of GridConfig settings, got [0.1, 0.2]"),
    ("batch sizes do not divide", "train: {micro_batch_size: 24, global_batch_size: 32}\n",
     "train.global_batch_size: 32 is not a multiple of micro_batch_size 24"),
    ("boolean for a number", "train: {lr: true}\n", "train.lr: expected a finite number, got True"),
    ("triplets without templates", "data: {source: triplets, knowledge_triplets: k.jsonl, general_triplets: g.jsonl}\n",
     "data.templates_file: source: triplets needs templates_file; fix: give the path of a YAML templates file"),
    ("bad run name", "name: my run/1\n",
     "name: 'my run/1' is not a usable folder name; fix: use letters, digits, '.', '_' and '-'"),
    ("duplicate ratios", "grid: {ratios: [0.1, 0.1]}\n", "grid.ratios: duplicate ratios; fix: list each ratio once"),
    ("bad token budget", "grid: {token_budgets: [ten]}\n",
     "grid.token_budgets[0]: expected an integer (e.g. 2000000, 2M or 100B), got 'ten'"),
]


@pytest.mark.parametrize("text,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_messages(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    if expected.endswith(":"):
        assert message.startswith(expected)
    elif expected.endswith("is missing"):
        assert message.startswith(expected)
    else:
        assert message == expected


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: malformed YAML at line 3, column \d+: .*fix: check indentation"):
        load_config(write(tmp_path, "grid:\n  sizes: [cpu-s\n  ratios: [0.1]\n"))


def test_top_level_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level, got list"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found; fix: check the path"):
        load_config(tmp_path / "absent.yaml")


def test_param_count_formula_orders_sizes():
    counts = [BUILTIN_PRESETS[n].param_counts(50304)["non_embedding"] for n in ("137M", "350M", "760M", "1.3B", "3B")]
    assert counts == sorted(counts)
    assert 0.08e9 < counts[0] < 0.15e9 and 2.3e9 < counts[-1] < 3.2e9


def test_config_from_dict_round_trip():
    from kislurm.plan.loader import config_to_dict

    cfg = config_from_dict({"grid": {"ratios": [0.3]}})
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_architecture_options_are_checked():
    def model(**kw):
        return {"grid": {"sizes": ["m"]}, "models": {"m": {"num_layers": 2, "hidden_size": 32,
                                                            "num_attention_heads": 4, **kw}}}

    cfg = config_from_dict(model(activation="swiglu", num_query_groups=2, tensor_parallel="auto"))
    assert cfg.presets["m"].tensor_parallel == "auto" and cfg.presets["m"].query_groups == 2
    for kw, message in (({"activation": "relu"}, "models.m.activation: expected one of 'gelu', 'swiglu'"),
                        ({"num_query_groups": 3}, "num_query_groups 3 does not divide num_attention_heads 4"),
                        ({"num_query_groups": 2, "tensor_parallel": 4}, "tensor_parallel 4 does not divide "
                                                                        "num_query_groups 2"),
                        ({"tensor_parallel": "most"}, "models.m.tensor_parallel: expected an integer or one of "
                                                      "'auto', got 'most'")):
        with pytest.raises(ConfigError, match=message) as e:
            config_from_dict(model(**kw))
        assert "\n" not in str(e.value)


def test_validation_and_safe_ratio_settings(tmp_path):
    cfg = load_config(write(tmp_path, "analysis: {validate_sizes: [cpu-xl], safe_drop: 0.1}\n"))
    assert cfg.analysis.validate_sizes == ["cpu-xl"] and cfg.analysis.safe_drop == 0.1
    assert load_config(write(tmp_path, "name: x\n")).analysis.safe_drop == 0.05
    assert "unknown model preset 'huge'" in error_of(tmp_path, "analysis: {validate_sizes: [huge]}\n")
    assert "expected a fraction in (0, 0.5)" in error_of(tmp_path, "analysis: {safe_drop: 0.7}\n")
