"""train_net.py with a probe that sends a stop signal at a known point (tests/end_to_end/test_graceful_stop.py).

    MASKLAB_STOP_PROBE=<kind>@<iteration> python tests/end_to_end/stop_probe.py <train_net.py arguments>

It is also a train script for sweeps (it has train_net.py's ``main`` and
``build_argument_parser``). The signal comes from inside the run, at a chosen iteration, so the
tests do not depend on timing; it comes once per output folder (a requeued or resumed run is
not signalled again). ``probe.txt`` in the output folder records what happened. Kinds:

* ``import``: SIGTERM while a module is being imported (as TensorBoard's writer is on first
  use); the probe records "imported" in ``probe.txt`` when the import completed;
* ``eval``: SIGTERM while the periodic evaluation at that iteration processes its first batch;
* ``group``: after that iteration, SIGTERM to every process of the run's process group,
  DataLoader workers included, from another process (as Slurm's ``scancel`` or ``kill -TERM
  -<pgid>`` send it; start the run in a session of its own); ``group-eval``: the same during the
  evaluation, as ``eval``;
* ``double``: SIGINT, then SIGTERM and SIGUSR2 while the stop's checkpoint is being written;
* ``usr2``: SIGUSR2 (submitit's warning before a Slurm time limit); ``usr1``: SIGUSR1 (the
  warning signal many Slurm sites configure with ``--signal``);
* ``nan``: the weights become NaN before that iteration, so the loss does (an error, no stop).

Everything else is train_net.py's command line and code; the probe only subclasses its Trainer.
"""

import importlib
import os
import signal
import subprocess
import sys

import torch
from detectron2.engine import HookBase
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import train_net  # noqa: E402

KIND, _, ITERATION = os.environ["MASKLAB_STOP_PROBE"].partition("@")
ITERATION = int(ITERATION)


OUTPUT_DIR = os.environ.get("MASKLAB_STOP_PROBE_DIR")  # else the run's OUTPUT_DIR


def note(text):
    with open(os.path.join(OUTPUT_DIR, "probe.txt"), "a") as f:
        f.write(text + "\n")


def signal_process_group():
    """SIGTERM to the whole process group, sent by another process (the sender matters: torch's
    DataLoader workers treat a SIGTERM from their parent differently)."""
    killer = f"import os, signal; os.killpg({os.getpgid(0)}, signal.SIGTERM)"
    subprocess.run([sys.executable, "-c", killer])  # the killer is in the group and dies too


def fired():
    path = os.path.join(OUTPUT_DIR, "probe.txt")
    return os.path.exists(path) and "fired" in open(path).read()


SLOW_MODULE = """
import os, signal
os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the middle of the import
import json, fractions, decimal        # the rest of the module still has to run
READY = True
"""


class Probe(HookBase):
    def before_step(self):
        if KIND == "nan" and self.trainer.iter == ITERATION:
            with torch.no_grad():
                for parameter in self.trainer.model.parameters():
                    parameter.fill_(float("nan"))

    def after_step(self):
        if self.trainer.iter != ITERATION or fired():
            return
        note("fired")
        if KIND == "import":
            folder = OUTPUT_DIR
            with open(os.path.join(folder, "probe_slow_module.py"), "w") as f:
                f.write(SLOW_MODULE)
            sys.path.insert(0, folder)
            module = importlib.import_module("probe_slow_module")
            note("imported" if getattr(module, "READY", False) else "half-imported")
        elif KIND == "double":
            DoubleSignal.armed = True
            os.kill(os.getpid(), signal.SIGINT)
        elif KIND in ("usr1", "usr2"):
            os.kill(os.getpid(), getattr(signal, f"SIG{KIND.upper()}"))
        elif KIND == "group":
            signal_process_group()


class DoubleSignal:
    """A checkpointable whose state_dict() signals: the repeats land inside the save."""

    armed = False

    def state_dict(self):
        if DoubleSignal.armed:
            DoubleSignal.armed = False
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR2)
            note("signalled during save")
        return {}

    def load_state_dict(self, state):
        pass


class SignalDuringEvaluation(DatasetEvaluator):
    def __init__(self):
        self.sent = False

    def reset(self):
        pass

    def process(self, inputs, outputs):
        if not self.sent:
            self.sent = True
            if KIND == "group-eval":
                signal_process_group()
            else:
                os.kill(os.getpid(), signal.SIGTERM)
            note("signalled during evaluation")

    def evaluate(self):
        return {}


class ProbeTrainer(train_net.Trainer):
    def __init__(self, cfg):
        global OUTPUT_DIR
        OUTPUT_DIR = OUTPUT_DIR or cfg.OUTPUT_DIR
        super().__init__(cfg)
        self.checkpointer.add_checkpointable("probe", DoubleSignal())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator = super().build_evaluator(cfg, dataset_name, output_folder)
        if KIND in ("eval", "group-eval"):
            return DatasetEvaluators([evaluator, SignalDuringEvaluation()])
        return evaluator

    def build_hooks(self):
        hooks = super().build_hooks()
        # Before the last hook (the stop hook) on today's code; at the end on older code.
        hooks.insert(len(hooks) - 1, Probe())
        return hooks


# Where main looks the trainer up: masklab_d2.engine.trainer today, train_net.py on older code.
train_net.Trainer = sys.modules[train_net.main.__module__].Trainer = ProbeTrainer
main = train_net.main
build_argument_parser = train_net.build_argument_parser

if __name__ == "__main__":
    if hasattr(train_net, "invoke_main"):
        train_net.invoke_main()
    else:  # the command line of train_net.py before invoke_main existed (to compare behaviours)
        args = train_net.build_argument_parser().parse_args()
        train_net.launch(train_net.main, args.num_gpus, dist_url=args.dist_url, args=(args,))
