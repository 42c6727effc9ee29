"""Config sweeps: a grid of train_net.py runs, launched locally or on Slurm, resumable.

    python -m masklab_d2.tools.sweep SWEEP.yaml [--dry-run | --report] [options]

The sweep file's format, run names and commands, when a run is done, stale or resumed, the
launchers and the report are described in docs/sweeps.md. Modules: ``spec`` (the schema and its
expansion into runs), ``commands`` (train_net.py's command line), ``state`` (run folders and their
status files), ``fingerprint``, ``launch`` (local runs), ``slurm`` (submitit jobs), ``report``,
``stats`` (paired comparisons), ``tables`` (README tables) and ``cli`` (the command, its progress).
"""
