"""The nightly aggregation entry, as a script for cron or scrontab (the code, its options and the cron lines are in
kislurm.analysis.nightly; `python -m kislurm.analysis.nightly` is the same).

    python jobs/nightly.py RUN [RUN ...] [--reports DIR] [--keep N]
"""

import sys

from kislurm.analysis.nightly import main

if __name__ == "__main__":
    sys.exit(main())
