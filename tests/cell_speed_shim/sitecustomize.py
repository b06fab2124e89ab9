"""Applies tests/cell_speed.py's mode in every Python process the suite starts (on PYTHONPATH in fast mode only)."""

import os

if os.environ.get("KISLURM_TEST_CELLS", "normal") != "normal":
    import cell_speed

    cell_speed.apply(os.environ["KISLURM_TEST_CELLS"])
