"""Shared test setup: one torch thread (2-core CI), the Slurm cluster fixture from tests/slurm_fixtures.py, and
`--cells slow|fast` (tests/cell_speed.py) to run the suite with cells slowed down or twice as fast."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:  # the fixture module is optional until the Slurm tests exist
    from slurm_fixtures import *  # noqa: F401,F403
except ImportError:  # pragma: no cover
    pass


def pytest_addoption(parser):
    parser.addoption("--cells", choices=("normal", "slow", "fast"), default=os.environ.get("KISLURM_TEST_CELLS",
                     "normal"), help="run every cell slowed down or twice as fast (tests/cell_speed.py)")


def pytest_configure(config):
    import cell_speed

    cell_speed.apply(config.getoption("--cells"))


def pytest_runtest_setup(item):
    import cell_speed

    cell_speed.HALVING["on"] = item.get_closest_marker("config_as_written") is None
