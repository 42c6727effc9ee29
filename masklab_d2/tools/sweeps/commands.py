"""What train_net.py is told for a run: its command line, its overrides in the syntax of its
config system (``KEY VALUE`` for YAML, ``key=value`` for a LazyConfig)."""

from typing import List, Optional, Sequence

from masklab_d2.tools.sweeps.spec import Run, SweepSpec
from masklab_d2.utils.config_files import is_lazy_config


def train_args(spec: SweepSpec, run: Run, resume: bool = False) -> List[str]:
    """The train_net.py arguments of a run (its command line after the script)."""
    args = ["--config-file", run.cell.config_file]
    if spec.num_gpus > 1:
        # A free port per run: detectron2's default port is the same for all of a user's runs,
        # so two multi-GPU runs on one node would collide.
        args += ["--num-gpus", str(spec.num_gpus), "--dist-url", "auto"]
    if resume:
        args.append("--resume")
    return args + run_overrides(run)


def config_overrides(
    config_file: str,
    output_dir: str,
    seed: int,
    pairs: Sequence[str],
    device: Optional[str] = None,
) -> List[str]:
    """A run's overrides on the command line of its config system: ``KEY VALUE`` pairs for a
    YAML config, ``key=value`` for a LazyConfig; its output folder and seed first.

    Args:
        pairs: flat [KEY, VALUE, ...] overrides (a cell's), keys as the config system names them.
        device: when given, the device last (``MODEL.DEVICE`` / ``train.device``).
    """
    if not is_lazy_config(config_file):
        device_pair = ["MODEL.DEVICE", device] if device else []
        return ["OUTPUT_DIR", output_dir, "SEED", str(seed)] + list(pairs) + device_pair
    keys_values = zip(pairs[::2], pairs[1::2])
    # Quoted: a run's folder name holds "=", which Hydra's override grammar would reject.
    quoted_dir = "'" + output_dir.replace("'", "\\'") + "'"
    device_override = [f"train.device={device}"] if device else []
    return (
        [f"train.output_dir={quoted_dir}", f"train.seed={seed}"]
        + [f"{key}={value}" for key, value in keys_values]
        + device_override
    )


def run_overrides(run: Run) -> List[str]:
    """The overrides of a run (:func:`config_overrides`)."""
    return config_overrides(run.cell.config_file, run.output_dir, run.seed, run.cell.overrides)


def train_command(spec: SweepSpec, run: Run, resume: bool = False) -> List[str]:
    """The train_net.py command of a run."""
    return [spec.python, spec.train_script] + train_args(spec, run, resume)
