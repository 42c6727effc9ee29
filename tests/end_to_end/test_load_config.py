"""load_config's device choice: no silent switch from a GPU to the CPU."""

import logging
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.detectron2

from helpers import REPO  # noqa: E402

from masklab_d2.config import load_config  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.yaml")


@pytest.fixture
def no_gpu(monkeypatch, caplog):
    """A CUDA build of PyTorch on a machine (or Slurm job) where no GPU is visible."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.delenv("MASKLAB_ALLOW_CPU", raising=False)
    # detectron2's setup_logger stops "masklab_d2" records from reaching the root logger.
    logger = logging.getLogger("masklab_d2.config")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="masklab_d2.config")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_a_cuda_config_without_a_gpu_is_an_error_where_the_fallback_is_not_asked_for(no_gpu):
    with pytest.raises(RuntimeError, match="no GPU is visible.*MASKLAB_ALLOW_CPU=1"):
        load_config(CONFIG, ["MODEL.DEVICE", "cuda"], allow_cpu_fallback=None)
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        load_config(CONFIG, ["MODEL.DEVICE", "cuda:1"], allow_cpu_fallback=False)


def test_the_cpu_fallback_is_loud_and_only_where_asked(no_gpu, monkeypatch):
    # Interactive tools ask for it; it says so.
    assert load_config(CONFIG, ["MODEL.DEVICE", "cuda"]).MODEL.DEVICE == "cpu"
    assert "NO GPU VISIBLE" in no_gpu.text
    no_gpu.clear()
    monkeypatch.setenv("MASKLAB_ALLOW_CPU", "1")
    cfg = load_config(CONFIG, ["MODEL.DEVICE", "cuda"], allow_cpu_fallback=None)
    assert cfg.MODEL.DEVICE == "cpu" and "NO GPU VISIBLE" in no_gpu.text
    monkeypatch.delenv("MASKLAB_ALLOW_CPU")
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only PyTorch build
    assert (
        load_config(CONFIG, ["MODEL.DEVICE", "cuda"], allow_cpu_fallback=None).MODEL.DEVICE == "cpu"
    )


def test_auto_device(no_gpu, monkeypatch):
    assert (
        load_config(CONFIG, ["MODEL.DEVICE", "auto"], allow_cpu_fallback=False).MODEL.DEVICE
        == "cpu"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config(CONFIG, ["MODEL.DEVICE", "auto"]).MODEL.DEVICE == "cuda"
    # A visible GPU: nothing to decide.
    assert (
        load_config(CONFIG, ["MODEL.DEVICE", "cuda"], allow_cpu_fallback=False).MODEL.DEVICE
        == "cuda"
    )


@pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is None, reason="needs no GPU")
def test_train_net_refuses_a_cuda_config_without_a_gpu(tmp_path):
    command = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG]
    command += ["MODEL.DEVICE", "cuda", "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "MASKLAB_ALLOW_CPU"}
    result = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300
    )
    assert result.returncode != 0 and "no GPU is visible" in result.stdout, result.stdout[-2000:]
