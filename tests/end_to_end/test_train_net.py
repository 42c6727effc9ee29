"""train_net.py end to end on the tiny shapes splits: train + evaluate with seen / unseen AP,
resume after an interruption, head-only training, evaluation only."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.detectron2

from helpers import REPO, TINY_YAML_OPTS, run_python  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.yaml")
# helpers' tiny run, with a 2-iteration warm-up.
TINY = TINY_YAML_OPTS + ["SOLVER.WARMUP_ITERS", "2"]


def _run(args, output_dir, timeout=600):
    """train_net.py on the tiny shapes splits; stdout and stderr together in .stdout."""
    command = [os.path.join(REPO, "train_net.py"), "--config-file", CONFIG] + args
    return run_python(*command, *TINY, "OUTPUT_DIR", str(output_dir), timeout=timeout)


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_evaluate_and_resume_after_interruption(tmp_path):
    output = tmp_path / "run"
    command = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG]
    command += TINY + [
        "SOLVER.MAX_ITER",
        "400",
        "SOLVER.CHECKPOINT_PERIOD",
        "1000",
        "OUTPUT_DIR",
        str(output),
    ]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        # Interrupt once training is under way (iteration 20 prints a metrics line), as a
        # scheduler would: wherever the signal lands, the run stops after a whole iteration.
        deadline = time.time() + 300
        while time.time() < deadline and "iter: 19" not in log_path.read_text():
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=300)
    first_log = log_path.read_text()
    assert "iter: 19" in first_log, first_log[-3000:]
    assert returncode == 75, first_log[-3000:]  # "interrupted, resumable" for the sweep
    saved = (output / "last_checkpoint").read_text().strip()
    saved_iteration = int(saved.split("_")[-1].split(".")[0])
    assert f"stopping after iteration {saved_iteration}; saving" in first_log, first_log[-3000:]
    assert saved_iteration >= 19 and (output / saved).exists()

    resumed = _run(
        ["--resume", "SOLVER.MAX_ITER", str(saved_iteration + 4), "TEST.EVAL_PERIOD", "0"], output
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"Starting training from iteration {saved_iteration + 1}" in resumed.stdout
    assert (output / "model_final.pth").exists()
    # Final evaluation: all-class box / mask AP and mask AP on seen and unseen classes.
    final = [m for m in _metrics(output) if "segm/AP" in m][-1]
    for key in (
        "bbox/AP",
        "segm/AP",
        "segm/seen/AP",
        "segm/unseen/AP",
        "segm/voc/AP",
        "segm/nonvoc/AP",
    ):
        assert key in final, sorted(final)
    assert "Mask AP by class group" in resumed.stdout

    # Head-only training from the trained detector: the detector's weights do not move.
    head_only = tmp_path / "head_only"
    result = _run(
        [
            "MODEL.FREEZE_DETECTOR",
            "True",
            "MODEL.WEIGHTS",
            str(output / "model_final.pth"),
            "SOLVER.MAX_ITER",
            "3",
            "TEST.EVAL_PERIOD",
            "0",
        ],
        head_only,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Detector frozen; training" in result.stdout
    assert "the mask branch starts from its initialisation" in result.stdout
    import torch

    before = torch.load(output / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    after = torch.load(head_only / "model_final.pth", map_location="cpu", weights_only=False)[
        "model"
    ]
    for name, value in after.items():
        if name.startswith(("backbone.", "proposal_generator.", "roi_heads.box_")):
            assert torch.equal(value, before[name]), name
    assert any(
        not torch.equal(after[n], before[n]) for n in after if n.startswith("roi_heads.mask_head.")
    )

    # Evaluation only, from the checkpoint.
    evaluated = _run(
        ["--eval-only", "MODEL.WEIGHTS", str(output / "model_final.pth")], tmp_path / "eval"
    )
    assert evaluated.returncode == 0, evaluated.stdout[-3000:]
    assert "copypaste" in evaluated.stdout and "seen" in evaluated.stdout


def test_bad_configuration_values_fail_clearly(tmp_path):
    result = _run(
        ["DATASETS.MASK_TRAIN_CLASSES", "voc,not_a_shape", "SOLVER.MAX_ITER", "1"], tmp_path / "a"
    )
    assert result.returncode != 0 and "not_a_shape" in result.stdout
    result = _run(["SOLVER.OPTIMIZER", "LION", "SOLVER.MAX_ITER", "1"], tmp_path / "b")
    assert result.returncode != 0 and "SOLVER.OPTIMIZER must be" in result.stdout
    result = _run(["MODEL.FREEZE_DETECTOR", "True", "SOLVER.MAX_ITER", "1"], tmp_path / "c")
    assert result.returncode != 0 and "set MODEL.WEIGHTS" in result.stdout
    result = _run(
        ["MODEL.ROI_MASK_HEAD.NAME", "NoSuchHead", "SOLVER.MAX_ITER", "1"], tmp_path / "d"
    )
    assert result.returncode != 0 and "NoSuchHead" in result.stdout


def test_more_gpus_than_the_machine_has_fail_clearly(tmp_path):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    result = _run(["--num-gpus", "2", "SOLVER.MAX_ITER", "1"], tmp_path / "a")
    assert result.returncode != 0
    assert "--num-gpus 2 starts one training process per GPU" in result.stdout, result.stdout[
        -3000:
    ]
    assert "Traceback" not in result.stdout
