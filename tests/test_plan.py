"""Grid expansion: every combination once, stable ids that change exactly when the computation changes."""

import pytest

from kislurm.config import config_from_dict
from kislurm.plan import expand


def cfg(**grid):
    return config_from_dict({"grid": {"sizes": ["cpu-s", "cpu-l"], "ratios": [0.5, 0.1], "seeds": [0, 1],
                                      "token_budgets": [1000, 2000], **grid}})


def test_grid_is_full_product_in_stable_order():
    cells = expand(cfg())
    assert len(cells) == 2 * 2 * 2 * 2
    assert len({c.cell_id for c in cells}) == len(cells)
    assert len({c.name for c in cells}) == len(cells)
    assert [c.ratio for c in cells[:4]] == [0.1, 0.1, 0.5, 0.5]  # ratios sorted within size and budget


def test_ids_are_stable_across_processes_and_orders():
    a = {c.name: c.cell_id for c in expand(cfg())}
    b = {c.name: c.cell_id for c in expand(cfg(ratios=[0.1, 0.5], seeds=[1, 0]))}
    assert a == b
    # a fixed, known id: changes only when the effective-config schema changes (a deliberate break)
    first = expand(config_from_dict({"grid": {"sizes": ["cpu-s"], "ratios": [0.1], "token_budgets": [1000]}}))[0]
    assert first.cell_id == expand(config_from_dict(
        {"grid": {"sizes": ["cpu-s"], "ratios": [0.1], "token_budgets": [1000]}}))[0].cell_id


def test_id_changes_with_what_changes_results_only():
    base = expand(config_from_dict({"grid": {"sizes": ["cpu-s"], "ratios": [0.1]}}))[0]
    lr = expand(config_from_dict({"grid": {"sizes": ["cpu-s"], "ratios": [0.1]}, "train": {"lr": 1e-3}}))[0]
    data = expand(config_from_dict({"grid": {"sizes": ["cpu-s"], "ratios": [0.1]}, "data": {"seed": 7}}))[0]
    slurm = expand(config_from_dict({"grid": {"sizes": ["cpu-s"], "ratios": [0.1]},
                                     "executor": {"cluster": "slurm", "partition": "gpu"}, "name": "other"}))[0]
    assert base.cell_id != lr.cell_id
    assert base.cell_id != data.cell_id
    assert base.cell_id == slurm.cell_id  # where it runs is not what it computes


def test_steps_and_eval_steps():
    c = expand(config_from_dict({"grid": {"sizes": ["cpu-s"], "ratios": [0.1], "token_budgets": [100_000]},
                                 "train": {"global_batch_size": 32, "eval_interval": 40}}))[0]
    assert c.steps == -(-100_000 // (32 * 32))
    assert c.eval_steps[-1] == c.steps and c.eval_steps[0] == 40
    assert all(b > a for a, b in zip(c.eval_steps, c.eval_steps[1:]))
    assert c.n_samples == c.steps * 32


@pytest.mark.config_as_written  # pins the demo's cell ids: --cells fast would change its token budget
def test_architecture_fields_enter_the_id_only_when_not_default():
    """GPT-2-shaped cells keep the ids they had before the architecture fields existed (pinned), and each
    non-default architecture option makes a new id."""
    from pathlib import Path

    from kislurm.config import load_config

    demo = expand(load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    assert (demo[0].cell_id, demo[-1].cell_id) == ("cda9fad86c", "ad03372be9")
    base = {"grid": {"sizes": ["m"], "ratios": [0.1]},
            "models": {"m": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4}}}
    ids = {expand(config_from_dict(base))[0].cell_id}
    for key, value in (("position_embedding", "rope"), ("activation", "swiglu"), ("normalization", "rmsnorm"),
                       ("num_query_groups", 2), ("tie_embeddings", False)):
        variant = {**base, "models": {"m": {**base["models"]["m"], key: value}}}
        ids.add(expand(config_from_dict(variant))[0].cell_id)
    assert len(ids) == 6
    explicit = {**base, "models": {"m": {**base["models"]["m"], "position_embedding": "learned",
                                         "tie_embeddings": True}}}
    assert expand(config_from_dict(explicit))[0].cell_id == expand(config_from_dict(base))[0].cell_id
