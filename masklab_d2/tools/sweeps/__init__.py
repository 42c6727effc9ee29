"""Config sweeps: a grid of train_net.py runs, launched locally or on Slurm, resumable.

    python -m masklab_d2.tools.sweep projects/shapes-partial-heads/sweep.yaml --dry-run
    python -m masklab_d2.tools.sweep projects/shapes-partial-heads/sweep.yaml [--parallel 2]
    python -m masklab_d2.tools.sweep projects/shapes-partial-heads/sweep.yaml --launcher slurm
    python -m masklab_d2.tools.sweep projects/shapes-partial-heads/sweep.yaml --report \
        [--report-dir projects/shapes-partial-heads]
    (also: --output-root DIR, --filter REGEX on run names, --no-retry-failed, --no-report,
     --rerun-stale, --forget-queued)

A sweep file (YAML) describes the runs::

    base_config: configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml  # relative to the sweep
                                                    # file, else to the repository, else the cwd
    output_root: output/sweeps/shapes-partial-heads # relative to the cwd (as OUTPUT_DIR is)
    axes:                                           # the grid: the product of all axes
      head:                                         # named groups: label -> config and/or keys
        mask_rcnn: {config: configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml}
        masklab: {config: configs/shapes-partial/masklab_R_18_FPN_gtcrop.yaml}
      MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE: [64, 128]   # a config key and its values
    cells:                                          # extra cells beside the grid (optional;
                                                    # without axes, the only cells)
      - {head: masklab, MODEL.MASKLAB.NUM_DIRECTIONS: 4}
      - {name: masklab_no_refine, head: masklab, opts: {MODEL.MASKLAB.HYPERCOLUMN_FEATURES: []}}
      - {head: mask_rcnn, MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES: False, seeds: [0]}  # own seeds
    seeds: [0, 1]                                   # or a count: 2 (= [0, 1]); default [0]
    opts: {SOLVER.MAX_ITER: 4500}                   # common overrides (mapping or flat list)
    num_gpus: 1                                     # per run (train_net.py --num-gpus; 0: CPU)
    launcher: local                                 # local | slurm | submitit-local
    parallel: 1                                     # local runs at a time, each on its own GPUs
    env: {}                                         # extra environment of every run
    table: [segm/AP, segm/AP75, segm/seen/AP]       # results.md's metric columns (optional)
    baseline: {head: mask_rcnn}                     # paired comparisons against it (optional)
    slurm: {partition: gpu, time: 240, cpus: 10, mem: 64, array_parallelism: 32}  # submitit

A group is a mapping with an optional ``config`` (replacing the base config: a head needs several
keys, so a cell can switch whole config files), optional ``opts`` and any other ``KEY: value``
overrides. An explicit cell maps axis names to labels (named groups) or config keys to values, and
may set ``name``, ``config``, ``opts`` and its own ``seeds``. Every run is ``python train_net.py
--config-file C [--num-gpus n --dist-url auto] [--resume] OUTPUT_DIR <output_root>/<run name> SEED
<seed> <overrides>`` where the overrides are the common opts, then the axes' in axis order, then the
explicit cell's. A cell whose config is a LazyConfig ``.py`` file gets ``train.output_dir='<dir>'
train.seed=<seed> key=value ...`` instead (its keys are the LazyConfig's, e.g.
``model.roi_heads.mask_head.num_filters``).

A run's name is built from its axis values, e.g. ``head=masklab__MASKLAB.NUM_DIRECTIONS=4__seed=0``
(a leading ``MODEL.`` is dropped from keys; characters other than ``A-Za-z0-9._+=~-`` become
``-``; a name over 120 characters, or two that would read alike, get ``~`` and a hash of what
they run), so it is stable across reruns and safe as a folder name.

Runs launch seed by seed: every cell's first seed, then every cell's second, and so on, so a sweep
stopped part way has measured each cell once before it measures any twice. Rerunning a sweep
continues it. A run is **done** when its folder has ``model_final.pth`` and its final evaluation and
its status file (``sweep_run.json``) records the same fingerprint as the sweep computes now: the
hash of the merged config (defaults, config files, all overrides) and a digest of the code a run
executes (the package without its tools, csrc/, train_net.py, setup.py; committed or not: commits to
docs, tests or tools keep runs valid). A done run is skipped; one with another fingerprint (or none)
is **stale**: reported, and rerun from scratch only with ``--rerun-stale`` (its folder is moved to
``<run>.stale-<time>``, never deleted). A run with a checkpoint but unfinished (interrupted,
preempted, timed out: train_net.py exits with 75 after saving) reruns with ``--resume``; one that
failed (``sweep_run.json`` holds the return code and the last 50 lines of its log ``sweep_run.log``)
is retried unless ``--no-retry-failed``. A run whose status file shows a live heartbeat (another
sweep process), or whose Slurm job is queued or running (asked through submitit's job objects; a
Slurm that cannot answer counts as queued, so nothing is submitted twice; ``--forget-queued``
relaunches such runs) is left alone. A failing run never stops the others. While it runs, a line per
change gives the done / running / failed / pending counts and an ETA;
``<output_root>/sweep_status.json`` holds the same. ``--report`` (and the end of every sweep) writes
results.csv, results.md and plots, see :mod:`masklab_d2.tools.sweeps.report`; with a
``baseline``, also every cell's mean paired difference from its baseline cell (by seed) with its
95% interval and verdict (paired.csv, and a section of results.md), see
:mod:`masklab_d2.tools.sweeps.stats`.

Launchers: ``local`` runs ``parallel`` runs at a time as subprocesses in their own sessions,
each on its own ``num_gpus`` GPUs (CUDA_VISIBLE_DEVICES; fewer at a time, with a warning, where
there are not enough; never two on one GPU), with OMP_NUM_THREADS = max(1, cores // parallel)
and, for multi-GPU runs, ``--dist-url auto`` (a free port each). Ctrl-C or SIGTERM stops each
run once; it saves a checkpoint. ``slurm`` submits a job array through submitit that trains in
the job's own process: one task per GPU with submitit's distributed environment (the port
derived from the job id), a code snapshot (``RsyncSnapshot``, ``slurm: {snapshot: false}`` to
turn it off), ``slurm: {array_parallelism: n}`` jobs at a time. On preemption or near the time
limit Slurm sends USR2: training stops after the current iteration with a checkpoint, then
submitit's ``checkpoint()`` requeues the job, which resumes from it. ``submitit-local`` is the
same code path on this machine through submitit's LocalExecutor (for tests).
"""
