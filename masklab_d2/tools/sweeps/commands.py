"""What train_net.py is told for a run: its command line, its overrides in the syntax of its
config system (``KEY VALUE`` for YAML, ``key=value`` for a LazyConfig)."""

import dataclasses
from typing import Dict, List, Optional, Sequence

from masklab_d2.tools.sweeps.spec import Run, SweepSpec
from masklab_d2.utils.config_files import is_lazy_config


def config_overrides(
    config_file: str,
    output_dir: str,
    seed: int,
    pairs: Sequence[str],
    device: Optional[str] = None,
) -> List[str]:
    """A run's overrides on the command line of its config system: ``KEY VALUE`` pairs for a
    YAML config, ``key=value`` for a LazyConfig; its output folder and seed first, then ``pairs``
    (flat [KEY, VALUE, ...], a cell's), then ``device`` when given."""
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


@dataclasses.dataclass
class RunTask:
    """What a worker (thread, submitit job) needs to execute one run; picklable. ``--resume`` is
    decided when the run starts, from the files then on disk (a requeued job resumes)."""

    name: str
    output_dir: str
    python: str
    train_script: str
    config_args: List[str]  # --config-file C [--num-gpus n --dist-url auto]
    overrides: List[str]  # OUTPUT_DIR ... SEED ... KEY VALUE ...
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    fingerprint: Dict[str, str] = dataclasses.field(default_factory=dict)

    def args(self, resume: bool) -> List[str]:
        """train_net.py's arguments."""
        return self.config_args + (["--resume"] if resume else []) + self.overrides

    def command(self, resume: bool) -> List[str]:
        return [self.python, self.train_script] + self.args(resume)


def make_task(spec: SweepSpec, run: Run, fingerprint: Optional[Dict[str, str]] = None) -> RunTask:
    """The task of a run; ``fingerprint`` (:mod:`.fingerprint`) is recorded when it starts."""
    args = ["--config-file", run.cell.config_file]
    if spec.num_gpus > 1:
        # A free port per run: detectron2's default port is the same for all of a user's runs,
        # so two multi-GPU runs on one node would collide.
        args += ["--num-gpus", str(spec.num_gpus), "--dist-url", "auto"]
    overrides = config_overrides(run.cell.config_file, run.output_dir, run.seed, run.cell.overrides)
    env, fingerprint = dict(spec.env), fingerprint or {}
    return RunTask(
        run.name, run.output_dir, spec.python, spec.train_script, args, overrides, env, fingerprint
    )


def train_command(spec: SweepSpec, run: Run, resume: bool = False) -> List[str]:
    """The train_net.py command of a run."""
    return make_task(spec, run).command(resume)
