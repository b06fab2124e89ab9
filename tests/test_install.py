"""A non-editable install (no source tree on the path) plans, dry-runs and trains: the node entry, the configs and
everything a compute node imports come from the installed package."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_non_editable_install_plans_dry_runs_and_trains(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            "--target", str(site), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = site / "share" / "kislurm" / "configs" / "tiny.yaml"  # shipped with the package (data_files)
    assert config.is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def kislurm(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "kislurm.cli", *args], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    where = subprocess.run([sys.executable, "-c", "import kislurm, kislurm.cluster.cell_job; print(kislurm.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # the installed copy, not the source tree
    one_cell = ["--set", f"output_root={elsewhere / 'runs'}", "--set", "grid.sizes=[cpu-xxs]",
                "--set", "grid.ratios=[0.5]"]
    assert "1 cells = 1 sizes" in kislurm("plan", str(config), *one_cell)
    assert "#SBATCH --array=0-0%1" in kislurm("submit", str(config), "--dry-run", "--set", "executor.cluster=slurm",
                                             *one_cell)
    kislurm("submit", str(config), *one_cell)
    status = kislurm("status", str(elsewhere / "runs" / "tiny"))
    assert "1 cells: 1 done" in status, status
