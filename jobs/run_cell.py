"""The compute-node entry, as a script: run one grid cell by hand (the code lives in kislurm.cell_job, so an
installed kislurm needs no source tree; `python -m kislurm.cell_job` is the same).

    python jobs/run_cell.py RUN_DIR CELL_NAME
"""

import sys

from kislurm.cell_job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
