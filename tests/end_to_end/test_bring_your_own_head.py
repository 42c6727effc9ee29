"""docs/bring_your_own_head.md, done as it says: a mask head defined here (not in the package),
registered in ROI_MASK_HEAD_REGISTRY, trained head-only on the tiny shapes data through the sweep
tool with the guide's training script and its one sweep line, then its row (mask AP and Boundary
AP) in the sweep's report, its cost row and its pictures. The guide's head and script are this
file's, checked text for text, so the two cannot drift apart."""

import csv
import inspect
import os
import re

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import configurable  # noqa: E402
from detectron2.layers import Conv2d, ConvTranspose2d, ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.roi_heads.mask_head import (  # noqa: E402
    ROI_MASK_HEAD_REGISTRY,
    BaseMaskRCNNHead,
)
from helpers import CONFIGS, REPO, tiny_cfg  # noqa: E402
from torch import nn  # noqa: E402

import masklab_d2.modeling  # noqa: E402,F401  (registers the project's backbones and ROI heads)
from masklab_d2.modeling import class_agnostic, recording, uses_image_targets  # noqa: E402

GUIDE = os.path.join(REPO, "docs", "bring_your_own_head.md")
BASE = os.path.join(CONFIGS, "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.yaml")


@ROI_MASK_HEAD_REGISTRY.register()
class TinyMaskHead(BaseMaskRCNNHead):
    """Two 3x3 convs, a 2x deconvolution, a 1x1 predictor: [R, C, M, M] -> [R, K, 2M, 2M]."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, num_masks: int = 1, conv_dim: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.convs = nn.Sequential(
            Conv2d(input_shape.channels, conv_dim, 3, padding=1, activation=F.relu),
            Conv2d(conv_dim, conv_dim, 3, padding=1, activation=F.relu),
        )
        self.deconv = ConvTranspose2d(conv_dim, conv_dim, 2, stride=2)
        self.predictor = Conv2d(conv_dim, num_masks, 1)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)  # vis_period, loss_weight
        agnostic = cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK
        ret.update(
            input_shape=input_shape,
            num_masks=1 if agnostic else cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            conv_dim=cfg.MODEL.ROI_MASK_HEAD.CONV_DIM,
        )
        return ret

    def layers(self, x):
        return self.predictor(F.relu(self.deconv(self.convs(x))))


def guide_blocks(language: str):
    """The guide's fenced code blocks in ``language``, in order."""
    with open(GUIDE) as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), flags=re.S)


def test_the_guide_shows_this_files_head_and_a_working_training_script():
    (heads,) = [b for b in guide_blocks("python") if "class TinyMaskHead" in b]
    assert inspect.getsource(TinyMaskHead) in heads
    (script,) = [b for b in guide_blocks("python") if "invoke_main()" in b]
    assert (
        "from masklab_d2.engine.trainer import build_argument_parser, invoke_main, main" in script
    )


def test_partially_supervised_configs_build_it_class_agnostic():
    model = build_model(tiny_cfg(BASE, **{"MODEL.ROI_MASK_HEAD.NAME": "TinyMaskHead"}))
    head = model.roi_heads.mask_head
    assert isinstance(head, TinyMaskHead) and head.predictor.out_channels == 1
    # The contract answers for it from its predictor (the guide's section 2b).
    assert class_agnostic(head) and not uses_image_targets(head)
    with recording(head) as record:
        assert record == {}


@pytest.mark.slow
def test_a_head_of_ones_own_joins_a_suite_with_one_line(tmp_path, capsys):
    from masklab_d2.tools import profile_heads
    from masklab_d2.tools import sweep as sweep_tool
    from masklab_d2.tools import visualize

    # A detector to train on (random weights; the key names of the suite's detector).
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(tiny_cfg(BASE)), save_dir=str(tmp_path)).save("detector")

    # The guide's training script, importing this file as the guide's module.
    (script,) = [b for b in guide_blocks("python") if "invoke_main()" in b]
    this_module = os.path.splitext(os.path.basename(__file__))[0]
    train_script = tmp_path / "train_my_heads.py"
    train_script.write_text(script.replace("import my_heads", f"import {this_module} as my_heads"))

    # The guide's sweep line, verbatim, beside a head of the project.
    (sweep_block,) = [b for b in guide_blocks("yaml") if "TinyMaskHead" in b]
    (tiny_line,) = [line for line in sweep_block.splitlines() if "TinyMaskHead" in line]
    assert "train_script:" in sweep_block
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    # The training subprocesses import this file as the guide's script imports "my_heads" (and
    # it imports the tests' helpers).
    helpers_dir = os.path.dirname(tests_dir)
    pythonpath = os.pathsep.join(
        filter(None, [tests_dir, helpers_dir, os.environ.get("PYTHONPATH")])
    )
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""name: byoh
base_config: {BASE}
output_root: {tmp_path / "out"}
train_script: {train_script}
axes:
  head:
    mask_rcnn: {{config: configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml}}
{tiny_line}
seeds: [0]
env: {{PYTHONPATH: "{pythonpath}"}}
opts:
  MODEL.FREEZE_DETECTOR: True
  MODEL.WEIGHTS: {tmp_path / "detector.pth"}
  SOLVER.MAX_ITER: 3
  SOLVER.WARMUP_ITERS: 1
  SOLVER.IMS_PER_BATCH: 2
  TEST.EVAL_PERIOD: 0
  TEST.PRECISE_BN.ENABLED: False
  DATALOADER.NUM_WORKERS: 0
  DATASETS.TRAIN: ["shapes_tiny_train"]
  DATASETS.TEST: ["shapes_tiny_val"]
  INPUT.MIN_SIZE_TRAIN: [128]
  INPUT.MAX_SIZE_TRAIN: 128
  INPUT.MIN_SIZE_TEST: 128
  INPUT.MAX_SIZE_TEST: 128
  MODEL.DEVICE: cpu
  MODEL.ROI_HEADS.SCORE_THRESH_TEST: 0.0  # a random detector: a few detections, any score
  TEST.DETECTIONS_PER_IMAGE: 5
parallel: 2
""")
    assert sweep_tool.main([str(sweep)]) == 0, capsys.readouterr().out[-3000:]

    # Its row in the report, with mask AP and Boundary AP, beside the project's head.
    out = tmp_path / "out"
    rows = {row["run"]: row for row in csv.DictReader(open(out / "results.csv"))}
    for run in ("head=tiny__seed=0", "head=mask_rcnn__seed=0"):
        row = rows[run]
        assert row["state"] == "done" and row["iteration"] == "3", row
        for key in ("segm/AP", "segm/unseen/AP", "boundary/AP", "boundary/unseen/AP"):
            assert re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", row[key]), (key, row)
    table_rows = [
        line.split("|")[1].strip() for line in open(out / "results.md") if "| 1/1 " in line
    ]
    assert table_rows == ["mask_rcnn", "tiny"]
    trained = torch.load(out / "head=tiny__seed=0" / "model_final.pth", weights_only=False)
    assert {k.split(".")[2] for k in trained["model"] if k.startswith("roi_heads.mask_head.")} == {
        "convs",
        "deconv",
        "predictor",
    }

    # Its cost row and its pictures, from the tools (this process has the head registered).
    table = profile_heads.main(
        ["--config-file", f"{BASE}@MODEL.ROI_MASK_HEAD.NAME=TinyMaskHead", "--detections", "10"]
        + ["--image-size", "128", "--repeat", "1", "--warmup", "0", "--device", "cpu"]
    )
    (row,) = [line for line in table.splitlines() if "TinyMaskHead" in line]
    params = sum(p.numel() for p in TinyMaskHead(ShapeSpec(channels=64), conv_dim=64).parameters())
    assert f"| {params / 1e6:.3f} |" in row
    written = visualize.main(
        ["--config-file", BASE, "--dataset", "shapes_tiny_val", "--num-images", "1"]
        + ["--output", str(tmp_path / "vis"), "--confidence-threshold", "0"]
        + [
            "MODEL.ROI_MASK_HEAD.NAME",
            "TinyMaskHead",
            "MODEL.WEIGHTS",
            str(out / "head=tiny__seed=0"),
        ]
        + ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]
        + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5"]
    )
    (paths,) = written.values()
    assert sorted(os.path.basename(p).split("_", 1)[1] for p in paths) == [
        "mask_crops.png",
        "predictions.png",
    ]
