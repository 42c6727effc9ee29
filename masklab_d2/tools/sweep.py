"""Config sweeps: ``python -m masklab_d2.tools.sweep SWEEP.yaml [options]``.

The format and behaviour are described in :mod:`masklab_d2.tools.sweeps` (``--help`` prints it);
the code lives there: ``spec`` (the schema and expansion), ``commands`` (train_net.py's command
line), ``state`` (run folders and their status records), ``fingerprint``,
``launch`` (local runs), ``slurm`` (submitit jobs), ``progress``, ``report`` and ``cli``.
"""

import sys

from masklab_d2.tools.sweeps.cli import main
from masklab_d2.tools.sweeps.spec import SweepError

if __name__ == "__main__":
    try:
        sys.exit(main())
    except SweepError as error:
        sys.exit(f"sweep: {error}")
