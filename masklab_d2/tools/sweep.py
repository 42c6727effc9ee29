"""Config sweeps: ``python -m masklab_d2.tools.sweep SWEEP.yaml [options]``; see docs/sweeps.md
and :mod:`masklab_d2.tools.sweeps`, where the code lives."""

import sys

from masklab_d2.tools.sweeps.cli import main
from masklab_d2.tools.sweeps.spec import SweepError

if __name__ == "__main__":
    try:
        sys.exit(main())
    except SweepError as error:
        sys.exit(f"sweep: {error}")
