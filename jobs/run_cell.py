"""The compute-node entry, as a script: run one grid cell by hand (the code lives in kislurm.cluster.cell_job, so an
installed kislurm needs no source tree; `python -m kislurm.cluster.cell_job` is the same).

    python jobs/run_cell.py RUN_DIR CELL_NAME
"""

import sys

from kislurm.cluster.cell_job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
