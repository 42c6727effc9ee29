"""A 2-process CPU (gloo) training with graceful stops, for tests/end_to_end/test_graceful_stop.py.

    python tests/end_to_end/stop_probe_ddp.py OUTPUT_DIR MAX_ITER STOP_AT [--resume]

detectron2's launch (through masklab_d2.engine.launch) starts two ranks training a small linear
model under DistributedDataParallel with detectron2's SimpleTrainer, LR scheduler hook and
DetectionCheckpointer. With STOP_AT >= 0, rank 0 sends SIGTERM to the launch parent after that
iteration and waits until the parent has forwarded it back, so the stop iteration is known.
Each rank writes the iteration it ended at into ``rank<r>.txt``. The data of an iteration depend
only on the iteration and the rank, so a resumed run sees what an uninterrupted one would.
"""

import os
import signal
import sys
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer, hooks
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from fvcore.common.param_scheduler import CosineParamScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from masklab_d2.engine import GracefulStopHook, launch, stop_requested


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss": ((self.linear(x) - y) ** 2).mean()}


class IterationData:
    """Batches as a function of (iteration, rank), starting at ``start``."""

    start = 0

    def __iter__(self):
        iteration = self.start
        while True:
            generator = torch.Generator().manual_seed(1000 * iteration + comm.get_rank())
            x = torch.randn(16, 8, generator=generator)
            yield x, x.sum(dim=1, keepdim=True)
            iteration += 1


class StopFromRankZero(hooks.HookBase):
    def __init__(self, stop_at):
        self.stop_at = stop_at

    def after_step(self):
        if self.trainer.iter != self.stop_at or not comm.is_main_process():
            return
        os.kill(os.getppid(), signal.SIGTERM)  # the launch parent, as `kill <pid>` would
        deadline = time.time() + 120
        while stop_requested() is None and time.time() < deadline:
            time.sleep(0.01)  # the parent forwards it; the handler runs during the sleep


class RecordEnd(hooks.HookBase):
    def __init__(self, output_dir):
        self.output_dir = output_dir

    def after_train(self):
        with open(os.path.join(self.output_dir, f"rank{comm.get_rank()}.txt"), "w") as f:
            f.write(str(self.trainer.iter))


def main(output_dir, max_iter, stop_at, resume):
    torch.manual_seed(0)
    model = Regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = IterationData()
    trainer = SimpleTrainer(DistributedDataParallel(model), data, optimizer)
    scheduler = LRMultiplier(optimizer, CosineParamScheduler(1.0, 0.1), max_iter)
    checkpointer = DetectionCheckpointer(model, output_dir, optimizer=optimizer, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(optimizer, scheduler),
            hooks.PeriodicCheckpointer(checkpointer, 1000, max_iter=max_iter),
            StopFromRankZero(stop_at),
            RecordEnd(output_dir),
            GracefulStopHook(checkpointer),
        ]
    )
    checkpointer.resume_or_load("", resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    data.start = start_iter
    trainer.train(start_iter, max_iter)


if __name__ == "__main__":
    output_dir, max_iter, stop_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.makedirs(output_dir, exist_ok=True)
    launch(main, 2, dist_url="auto", args=(output_dir, max_iter, stop_at, "--resume" in sys.argv))
