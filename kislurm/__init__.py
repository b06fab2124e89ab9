"""kislurm: knowledge-infusion scaling-law experiments on Slurm.

Plan a grid of model sizes x infusion ratios, submit it as job arrays, train each cell with megatron-core, record
knowledge retention in HDF5, and aggregate every run into collapse points and a scaling law.
"""

__version__ = "0.1.0"

import warnings  # noqa: E402

# megatron-core warns at import, eight times in all, that Transformer Engine and Apex are not installed and that it
# falls back to its torch implementations: known-harmless (kislurm's default path is those fallbacks, and a preset that
# asks for Transformer Engine without it is refused in one line), so every command starts with its own output.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                        category=UserWarning, module=r"megatron\.")

from kislurm.plan.config import ConfigError, ExperimentConfig  # noqa: E402
from kislurm.plan.grid import Cell, expand  # noqa: E402
from kislurm.plan.loader import load_config  # noqa: E402

__all__ = ["__version__", "ConfigError", "ExperimentConfig", "load_config", "Cell", "expand"]
