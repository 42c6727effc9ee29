"""The LazyConfig run path: the shapes lazy configs train a few iterations with partial masks and
evaluate through the seen / unseen evaluator; train_net.py runs a .py config end to end
(key=value overrides, --resume, --eval-only)."""

import glob
import json
import os
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import LazyConfig  # noqa: E402
from helpers import REPO, TINY_LAZY_OPTS, run_python  # noqa: E402

from masklab_d2.engine.lazy_train import do_train, resolve_device  # noqa: E402
from masklab_d2.utils.detectron2 import point_rend_available  # noqa: E402

LAZY = os.path.join(REPO, "configs", "lazy")
PARTIAL = sorted(glob.glob(os.path.join(LAZY, "shapes-partial", "*.py")))
# helpers' tiny run, with PreciseBN on two batches.
TINY = TINY_LAZY_OPTS + ["train.precise_bn.num_iter=2"]


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def first_images(dataset, count):
    """The first ``count`` records of a dataset (a LazyCall target for a smaller test set)."""
    return dataset[:count]


@pytest.mark.parametrize("path", PARTIAL, ids=lambda p: os.path.relpath(p, LAZY))
def test_shapes_lazy_config_trains_and_evaluates(path, tmp_path):
    if "point_rend" in os.path.basename(path) and not point_rend_available():
        pytest.skip("detectron2.projects.point_rend is not importable (README: Heads, PointRend)")
    cfg = LazyConfig.load(path)
    cfg = LazyConfig.apply_overrides(cfg, TINY + ["train.max_iter=2"])
    assert cfg.dataloader.mask_train_classes == "voc"
    cfg.train.output_dir = str(tmp_path)
    # Inference on 8 of the 32 validation images; the evaluator still scores against all of
    # them (the others count as missed), which is enough to see every group reported.
    cfg.dataloader.evaluator.dataset_name = cfg.dataloader.test.dataset.names
    cfg.dataloader.test.dataset = L(first_images)(dataset=cfg.dataloader.test.dataset, count=8)
    torch.manual_seed(0)
    do_train(SimpleNamespace(resume=False), cfg)

    assert (tmp_path / "model_final.pth").exists()
    metrics = _metrics(tmp_path)
    trained = [m for m in metrics if "loss_mask" in m]
    assert trained and trained[-1]["iteration"] == 1
    assert all(v == v and abs(v) != float("inf") for k, v in trained[-1].items() if "loss" in k)
    final = [m for m in metrics if "segm/AP" in m][-1]
    # Box / mask AP over all classes, and mask AP on the seen (voc) and unseen (nonvoc) groups.
    for key in ("bbox/AP", "segm/AP", "segm/seen/AP", "segm/unseen/AP", "segm/nonvoc/AP"):
        assert key in final, sorted(final)


def _train_net(args, timeout=600):
    """train_net.py with ``args``; stdout and stderr together in .stdout."""
    return run_python(os.path.join(REPO, "train_net.py"), *args, timeout=timeout)


def test_train_net_runs_a_lazy_config_with_overrides_resume_and_eval_only(tmp_path):
    config = ["--config-file", os.path.join(LAZY, "shapes", "mask_rcnn_R_18_FPN.py")]
    overrides = TINY + [
        f"train.output_dir={tmp_path}",
        "dataloader.mask_train_classes=voc",
        # Two convs of 16 channels and a 16-channel deconv instead of 4 x 64 + 64.
        "model.roi_heads.mask_head.conv_dims=[16,16,16]",
    ]
    first = _train_net(config + overrides + ["train.max_iter=2"])
    assert first.returncode == 0, first.stdout[-3000:]
    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    weights = state["model"]
    assert weights["roi_heads.mask_head.mask_fcn1.weight"].shape == (16, 64, 3, 3)
    assert "roi_heads.mask_head.mask_fcn3.weight" not in weights
    assert "Mask AP by class group" in first.stdout
    assert "Running precise-BN" in first.stdout  # train.precise_bn of the shapes configs
    final = [m for m in _metrics(tmp_path) if "segm/AP" in m][-1]
    assert "segm/seen/AP" in final and "segm/unseen/AP" in final

    resumed = _train_net(config + ["--resume"] + overrides + ["train.max_iter=3"])
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Starting training from iteration 2" in resumed.stdout

    evaluated = _train_net(
        config
        + ["--eval-only"]
        + overrides
        + [f"train.init_checkpoint={tmp_path / 'model_final.pth'}"]
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    assert "copypaste" in evaluated.stdout and "Mask AP by class group" in evaluated.stdout


def test_train_net_reports_a_bad_lazy_override(tmp_path):
    config = ["--config-file", os.path.join(LAZY, "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.py")]
    result = _train_net(
        config + TINY + [f"train.output_dir={tmp_path}", "dataloader.mask_train_classes=voc,nope"]
    )
    assert result.returncode != 0 and "nope" in result.stdout


def test_lazy_device_policy(monkeypatch):
    """As the YAML path: "auto" picks what is there; CUDA without a GPU needs MASKLAB_ALLOW_CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MASKLAB_ALLOW_CPU", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build, as on a cluster node
    cfg = LazyConfig.load(os.path.join(LAZY, "shapes", "mask_rcnn_R_18_FPN.py"))
    assert cfg.train.device == "auto"
    resolve_device(cfg)
    assert cfg.train.device == "cpu"
    cfg.train.device = "cuda"
    with pytest.raises(RuntimeError, match="no GPU is visible.*MASKLAB_ALLOW_CPU=1"):
        resolve_device(cfg)
    monkeypatch.setenv("MASKLAB_ALLOW_CPU", "1")
    resolve_device(cfg)
    assert cfg.train.device == "cpu"


def test_lazy_training_stops_gracefully_and_resumes(tmp_path, monkeypatch):
    """A stop requested during iteration 1 (as a signal would) saves that iteration and ends
    training; --resume continues from iteration 2."""
    from detectron2.engine import hooks

    from masklab_d2.engine import graceful_stop

    def load(max_iter):
        path = os.path.join(LAZY, "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.py")
        cfg = LazyConfig.apply_overrides(
            LazyConfig.load(path), TINY + [f"train.max_iter={max_iter}"]
        )
        cfg.train.output_dir = str(tmp_path)
        cfg.dataloader.evaluator.dataset_name = cfg.dataloader.test.dataset.names
        cfg.dataloader.test.dataset = L(first_images)(dataset=cfg.dataloader.test.dataset, count=4)
        return cfg

    timer_after_step = hooks.IterationTimer.after_step

    def after_step(self):  # the first hook: the stop lands mid-iteration, before the others
        timer_after_step(self)
        if self.trainer.iter == 1:
            graceful_stop.request_stop()

    monkeypatch.setattr(hooks.IterationTimer, "after_step", after_step)
    try:
        with pytest.raises(graceful_stop.StopTraining) as stopped:
            do_train(SimpleNamespace(resume=False), load(max_iter=6))
    finally:
        graceful_stop.reset()
        monkeypatch.undo()
    assert stopped.value.iteration == 1
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    saved = torch.load(tmp_path / "model_0000001.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 1
    assert not (tmp_path / "model_final.pth").exists()

    do_train(SimpleNamespace(resume=True), load(max_iter=3))
    assert (tmp_path / "model_final.pth").exists()
    iterations = [m["iteration"] for m in _metrics(tmp_path) if "loss_mask" in m]
    assert iterations == [1, 2]  # the stopped run's last iteration, then the resumed one
