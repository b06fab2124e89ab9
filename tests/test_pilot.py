"""The pilot: the smallest size at the grid's extreme ratios, a plateau above chance and a high ratio below it."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from kislurm.cli import main
from kislurm.plan.loader import config_from_dict
from kislurm.paths import RunPaths
from kislurm.analysis.pilot import PilotError, PilotResult, chance_of, judge, pilot_cells
from kislurm.plan.grid import expand


def test_verdicts():
    assert judge(PilotResult(0.05, 0.95, 0.9, 0.3, 0.25)).startswith("pilot ok:")
    for result, needle in ((PilotResult(0.05, 0.95, 0.4, 0.3, 0.25), "no plateau"),
                           (PilotResult(0.05, 0.95, 0.9, 0.7, 0.25), "cannot bracket")):
        with pytest.raises(PilotError, match=needle) as e:
            judge(result)
        assert "\n" not in str(e.value) and "fix:" in str(e.value)
    assert chance_of("general_acc", 4) == 0.25 and chance_of("general_acc_cc", 4) == 0.0


def test_pilot_cells_are_grid_cells_of_the_smallest_size():
    cfg = config_from_dict({"grid": {"sizes": ["cpu-m", "cpu-xs"], "ratios": [0.5, 0.05, 0.95],
                                     "seeds": [3, 4], "token_budgets": [1000, 2000]}})
    cells = pilot_cells(cfg)
    assert [(c.size, c.ratio, c.tokens, c.seed) for c in cells] == [("cpu-xs", 0.05, 1000, 3),
                                                                    ("cpu-xs", 0.95, 1000, 3)]
    assert {c.cell_id for c in cells} <= {c.cell_id for c in expand(cfg)}


@pytest.mark.parametrize("metric, ok", [("infused_acc", True), ("general_acc", False)])
def test_cli_pilot_reads_the_two_cells(tmp_path, metric, ok):
    """Stores already written for the pilot cells (so nothing trains): infused retention collapses between the
    extreme ratios (the grid brackets); general retention stays at 0.9 at both (it cannot)."""
    from test_aggregate import write_cell

    raw = {"name": "p", "output_root": str(tmp_path), "grid": {"sizes": ["cpu-xs", "cpu-s"],
                                                              "ratios": [0.1, 0.5, 0.9]},
           "analysis": {"metric": metric}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    run = RunPaths(tmp_path / "p")
    for c in pilot_cells(config_from_dict(raw)):
        write_cell(run, c.size, 1e4, 0.5, c.ratio, np.random.default_rng(0), name=c.name)
    out = CliRunner().invoke(main, ["pilot", str(tmp_path / "c.yaml")])
    lines = [s for s in out.output.splitlines() if s.strip()]
    if ok:
        assert out.exit_code == 0 and lines[-1].startswith("pilot ok:"), out.output
    else:
        assert out.exit_code == 2 and "cannot bracket" in lines[-1] and lines[-1].startswith("kislurm: error:")
