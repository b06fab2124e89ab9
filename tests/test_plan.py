"""Grid expansion: every combination once, stable ids that change exactly when the computation changes."""

import json
import os
import subprocess
import sys

import pytest

from kislurm.errors import ConfigError
from kislurm.plan.loader import config_from_dict
from kislurm.plan.grid import Cell, expand


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


GOLDEN = "cpu-s_r0.1_t1k_s0_38f5190da5"
"""The name (and id) of the default cell below, pinned: it changes only when the effective-config schema or a default
that enters the id changes, a deliberate break that orphans every finished cell of every run folder."""


@pytest.mark.parametrize("hash_seed", ["0", "12345"])
def test_golden_cell_id_in_a_fresh_process(hash_seed):
    """A fresh interpreter (another str hash seed, nothing cached) computes the pinned id."""
    code = ("from kislurm.plan.loader import config_from_dict; from kislurm.plan.grid import expand; "
            "print(expand(config_from_dict({'grid': {'sizes': ['cpu-s'], 'ratios': [0.1], "
            "'token_budgets': [1000]}}))[0].name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": hash_seed})
    assert out.stdout.strip() == GOLDEN


def test_cell_rebuilds_from_its_record():
    """cell.json alone gives back the cell (a validation cell's ratio is in no grid); a record whose settings no
    longer hash to its id, or an older record without the full cell, is refused in one line."""
    cell = expand(cfg(ratios=[0.123]))[0]
    record = json.loads(json.dumps(cell.to_json()))
    assert Cell.from_json(record) == cell
    record["cell"]["train"]["lr"] *= 2
    with pytest.raises(ConfigError, match=f"hash to cell id .* not the recorded {cell.cell_id}"):
        Cell.from_json(record)
    del record["cell"]
    with pytest.raises(ConfigError, match="older kislurm"):
        Cell.from_json(record)


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

    from kislurm.plan.loader import load_config

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


def test_per_size_train_overrides_apply_to_that_size_and_enter_its_id():
    """A preset's `train:` overrides replace the run's training settings for that size's cells only and so change
    their ids; no overrides (or overrides equal to the run's values) keep the ids; a bad key is one line."""
    import yaml

    from kislurm.plan.config import ConfigError
    from kislurm.plan.loader import config_to_dict

    shape = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
    base = {"grid": {"sizes": ["m", "cpu-s"], "ratios": [0.1], "token_budgets": [20_000]}, "models": {"m": shape}}
    plain = {c.size: c for c in expand(config_from_dict(base))}
    tuned_cfg = config_from_dict({**base, "models": {"m": {**shape, "train": {
        "lr": 1e-3, "global_batch_size": 64, "micro_batch_size": 8, "warmup_frac": 0.05}}}})
    tuned = {c.size: c for c in expand(tuned_cfg)}
    t = tuned["m"].train
    assert (t.lr, t.global_batch_size, t.micro_batch_size, t.warmup_frac) == (1e-3, 64, 8, 0.05)
    assert t.weight_decay == plain["m"].train.weight_decay  # the rest is the run's train: section
    assert tuned["m"].steps == -(-20_000 // (64 * tuned["m"].model.seq_length)) != plain["m"].steps
    assert tuned["m"].cell_id != plain["m"].cell_id
    assert tuned["cpu-s"].cell_id == plain["cpu-s"].cell_id and tuned["cpu-s"].train.lr == 3e-3
    same = config_from_dict({**base, "models": {"m": {**shape, "train": {"lr": 3e-3}}}})  # the run's own lr
    assert expand(same)[0].cell_id == plain["m"].cell_id
    # the run folder's config.yaml (what a compute node re-expands) gives the same cells
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(tuned_cfg), sort_keys=False)))
    assert [c.cell_id for c in expand(again)] == [c.cell_id for c in expand(tuned_cfg)]
    for bad, words in (({"lrr": 1e-3}, "models.m.train.lrr: unknown key (did you mean lr?)"),
                       ({"lr": 2.0}, "models.m.train.lr: expected a learning rate in (0, 1)"),
                       ({"global_batch_size": 24}, "models.m.train.global_batch_size: 24 is not a multiple")):
        with pytest.raises(ConfigError) as err:
            config_from_dict({**base, "models": {"m": {**shape, "train": bad}}})
        assert words in str(err.value) and "\n" not in str(err.value)


def test_plan_shows_per_size_overrides(tmp_path):
    from click.testing import CliRunner

    from kislurm.cli import main

    path = tmp_path / "ov.yaml"
    path.write_text(f"name: ov\noutput_root: {tmp_path}\ngrid: {{sizes: [m, cpu-s], ratios: [0.1], token_budgets: "
                    "[20000]}\nmodels:\n  m: {num_layers: 2, hidden_size: 32, num_attention_heads: 4, "
                    "train: {lr: 1.0e-3, global_batch_size: 64}}\n")
    out = CliRunner().invoke(main, ["plan", str(path)])
    assert out.exit_code == 0, out.output
    assert "m: train overrides global_batch_size=64, lr=0.001" in out.output
    assert "cpu-s: train overrides" not in out.output


def test_transformer_impl_enters_the_id_only_when_opted_in():
    shape = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "device": "gpu"}

    def cell_id(**extra):
        return expand(config_from_dict({"grid": {"sizes": ["m"], "ratios": [0.1]},
                                        "models": {"m": {**shape, **extra}}}))[0].cell_id

    assert cell_id(transformer_impl="local") == cell_id()
    assert cell_id(transformer_impl="transformer_engine") != cell_id()


def test_a_fields_own_metadata_decides_its_place_in_the_id():
    """grid reads each field's rule from its metadata (kislurm.plan.fields): no rule enters always, NOT_IN_ID never,
    IN_ID_UNLESS_DEFAULT only at a non-default value; the real sections carry their rules the same way."""
    import dataclasses

    from kislurm.plan.fields import IN_ID_UNLESS_DEFAULT, NOT_IN_ID
    from kislurm.plan.grid import section_id_json

    @dataclasses.dataclass(frozen=True)
    class Section:
        always: int = 1
        never: int = dataclasses.field(default=1, metadata=NOT_IN_ID)
        later: tuple = dataclasses.field(default_factory=tuple, metadata=IN_ID_UNLESS_DEFAULT)

    assert json.loads(section_id_json(Section())) == {"always": 1}
    assert section_id_json(Section(never=2)) == section_id_json(Section())
    assert json.loads(section_id_json(Section(always=2, later=(3,)))) == {"always": 2, "later": [3]}
    # a real NOT_IN_ID field of each hashed section (model layout and time limit, training cadence) keeps the id
    plain = {"grid": {"sizes": ["m"], "ratios": [0.1]},
             "models": {"m": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4}}}
    moved = {**plain, "models": {"m": {**plain["models"]["m"], "data_parallel": 2, "timeout_min": 5}},
             "train": {"keep_final": "full", "timeout_step_min": 3.0, "checkpoint_minutes": 1.0}}
    a, b = expand(config_from_dict(plain))[0], expand(config_from_dict(moved))[0]
    assert (a.model, a.train) != (b.model, b.train) and a.cell_id == b.cell_id
