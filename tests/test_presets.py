"""Presets that extend presets (`base:`): inheritance, overrides, chains, and one-line refusals of an unknown base
or a cycle; the shipped table, written the same way, keeps its presets and their cells' ids."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from kislurm.plan.config import ConfigError
from kislurm.plan.grid import expand
from kislurm.plan.loader import config_from_dict, load_config
from kislurm.plan.presets import BUILTIN_PRESETS

REPO = Path(__file__).resolve().parents[1]


def presets(models: dict, sizes: list[str]) -> dict:
    return config_from_dict({"grid": {"sizes": sizes, "ratios": [0.1]}, "models": models}).presets


def error(models: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"grid": {"sizes": ["cpu-s"]}, "models": models}, source="x.yaml")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_preset_inherits_its_base_and_overrides_what_it_lists():
    got = presets({"wide": {"base": "cpu-s", "hidden_size": 64, "train": {"lr": 1e-3}}}, ["wide"])["wide"]
    cpu_s = BUILTIN_PRESETS["cpu-s"]
    assert (got.hidden_size, got.train.lr) == (64, 1e-3)
    assert got == dataclasses.replace(cpu_s, hidden_size=64, train=got.train)  # every other field is the base's


def test_a_chain_resolves_and_a_field_is_replaced_whole():
    got = presets({"a": {"base": "cpu-s", "hidden_size": 64, "train": {"lr": 1e-3}},
                   "b": {"base": "a", "num_layers": 3, "train": {"global_batch_size": 64}}}, ["b"])["b"]
    assert (got.num_layers, got.hidden_size, got.num_attention_heads) == (3, 64, 4)
    assert (got.train.global_batch_size, got.train.lr) == (64, None)  # b's train: replaces a's, unmerged


def test_a_preset_naming_itself_extends_the_shipped_one_and_keeps_its_ids():
    """paper.yaml's form: layout and time limit are not in the id, so the extended preset's cells keep theirs."""
    shipped = expand(config_from_dict({"grid": {"sizes": ["cpu-s-llama"], "ratios": [0.1], "token_budgets": [1000]}}))
    assert shipped[0].name == "cpu-s-llama_r0.1_t1k_s0_0607c8e40c"  # the id from before the table used base:
    cfg = config_from_dict({"grid": {"sizes": ["cpu-s-llama"], "ratios": [0.1], "token_budgets": [1000]},
                            "models": {"cpu-s-llama": {"base": "cpu-s-llama", "data_parallel": 2, "timeout_min": 9}}})
    assert cfg.presets["cpu-s-llama"] == dataclasses.replace(BUILTIN_PRESETS["cpu-s-llama"], data_parallel=2,
                                                             timeout_min=9)
    assert [c.name for c in expand(cfg)] == [c.name for c in shipped]


def test_paper_yaml_equals_its_presets_written_whole():
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    assert all(set(p) == {"base", "data_parallel", "timeout_min"} for p in paper["models"].values())
    paper["models"]["137M-llama"] = {
        "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "num_query_groups": 3, "seq_length": 2048,
        "position_embedding": "rope", "activation": "swiglu", "normalization": "rmsnorm", "tie_embeddings": False,
        "device": "gpu", "tensor_parallel": "auto", "data_parallel": 8, "timeout_min": 2880}
    whole = config_from_dict(paper, base=REPO / "configs")
    assert whole == load_config(REPO / "configs" / "paper.yaml")


@pytest.mark.parametrize("models, message", [
    ({"x": {"base": "nope"}}, "x.yaml: models.x.base: unknown base preset 'nope'; fix: use one of ["),
    ({"a": {"base": "b"}, "b": {"base": "a"}},
     "x.yaml: models.b.base: presets extend each other in a cycle (a -> b -> a); fix: give one of them its fields"),
    ({"x": {"base": "x"}}, "x.yaml: models.x.base: presets extend each other in a cycle (x -> x)"),
    ({"x": {"base": 7}}, "x.yaml: models.x.base: expected the name of a preset to extend, got 7"),
    ({"x": {"bsae": "cpu-s"}}, "x.yaml: models.x.bsae: unknown key (did you mean base?)"),
])
def test_a_bad_base_is_one_line_naming_the_preset_and_the_fix(models, message):
    assert error(models).startswith(message)
