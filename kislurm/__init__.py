"""kislurm: knowledge-infusion scaling-law experiments on Slurm.

Plan a grid of model sizes x infusion ratios, submit it as job arrays, train each cell with megatron-core, record
knowledge retention in HDF5, and aggregate every run into collapse points and a scaling law.
"""

__version__ = "0.1.0"

from kislurm.plan.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from kislurm.plan.grid import Cell, expand  # noqa: E402

__all__ = ["__version__", "ConfigError", "ExperimentConfig", "load_config", "Cell", "expand"]
