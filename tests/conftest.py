"""Shared test setup: one torch thread (2-core CI), and the Slurm cluster fixture from tests/slurm_fixtures.py."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

try:  # the fixture module is optional until the Slurm tests exist
    from slurm_fixtures import *  # noqa: F401,F403
except ImportError:  # pragma: no cover
    pass
