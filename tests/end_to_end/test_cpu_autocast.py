"""Mixed precision on the CPU (masklab_d2.engine.cpu_autocast): SOLVER.AMP.ENABLED and
train.amp.enabled train with the training forward in bfloat16 where the CPU has it, and evaluate
in float32; detectron2's AMPTrainer alone fails on a CPU."""

import os
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.config import LazyConfig  # noqa: E402
from detectron2.engine import AMPTrainer, SimpleTrainer  # noqa: E402
from helpers import REPO, TINY_LAZY_OPTS, TINY_YAML_OPTS, run_python  # noqa: E402
from torch import nn  # noqa: E402

from masklab_d2.engine.cpu_autocast import (  # noqa: E402
    autocast_training_forward,
    build_step_trainer,
    cpu_has_bfloat16,
)
from masklab_d2.engine.lazy_train import do_train  # noqa: E402

# What the switch does on this CPU, and what the log says about it.
EXPECTED_LOG = (
    "the training forward runs in bfloat16" if cpu_has_bfloat16() else "Mixed precision ignored"
)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, fail=False):
        y = self.conv(x)
        if fail:
            raise RuntimeError("fails inside forward")
        return self.bn(y), y.dtype


def test_training_forwards_run_in_bfloat16_and_evaluation_in_float32():
    model = ConvNet()
    keys = list(model.state_dict())
    autocast_training_forward(model)
    x = torch.rand(2, 3, 8, 8)
    assert model(x)[1] == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")  # only inside the forward
    model.eval()
    assert model(x)[1] == torch.float32
    model.train()
    with pytest.raises(RuntimeError, match="fails inside forward"):
        model(x, fail=True)
    assert not torch.is_autocast_enabled("cpu")  # an error in forward closes it too
    assert list(model.state_dict()) == keys and model.conv.weight.dtype == torch.float32
    copy = __import__("copy").deepcopy(model)
    assert copy(x)[1] == torch.bfloat16


def test_the_step_trainer_per_device_and_switch():
    model = ConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert type(build_step_trainer(model, [], optimizer, amp=False)) is SimpleTrainer
    assert model(torch.rand(1, 3, 8, 8))[1] == torch.float32
    trainer = build_step_trainer(model, [], optimizer, amp=True)
    assert type(trainer) is SimpleTrainer and not isinstance(trainer, AMPTrainer)
    expected = torch.bfloat16 if cpu_has_bfloat16() else torch.float32
    assert model(torch.rand(1, 3, 8, 8))[1] == expected
    channels_last = model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert channels_last is cpu_has_bfloat16()
    assert optimizer.param_groups[0]["params"][0] is model.conv.weight  # changed in place


def test_yaml_training_with_amp_on_a_cpu(tmp_path):
    config = os.path.join(REPO, "configs", "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.yaml")
    result = run_python(
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        config,
        *TINY_YAML_OPTS,
        *("SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "0"),
        *("DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert EXPECTED_LOG in result.stdout
    assert (tmp_path / "model_final.pth").exists()


def test_lazy_training_with_amp_on_a_cpu(tmp_path, caplog):
    path = os.path.join(REPO, "configs", "lazy", "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.py")
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(path),
        TINY_LAZY_OPTS + ["train.max_iter=2", "train.amp.enabled=True", "train.eval_period=0"],
    )
    cfg.train.output_dir = str(tmp_path)
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="masklab_d2"):
        do_train(SimpleNamespace(resume=False), cfg)
    assert EXPECTED_LOG in caplog.text
    assert (tmp_path / "model_final.pth").exists()
