"""Config sweeps: ``python -m masklab_d2.tools.sweep SWEEP.yaml [options]``.

The format and behaviour are described in :mod:`masklab_d2.tools.sweeps` (``--help`` prints it);
the code lives there: ``spec`` (file and expansion), ``state`` (run folders), ``fingerprint``,
``launch`` (local and submitit), ``progress``, ``report`` and ``cli``.
"""

import sys

from masklab_d2.tools.sweeps.cli import main
from masklab_d2.tools.sweeps.spec import SweepError

if __name__ == "__main__":
    try:
        sys.exit(main())
    except SweepError as error:
        sys.exit(f"sweep: {error}")
