"""Every COCO config starts from an ImageNet checkpoint: MaskLabCheckpointer on fake C2 weights."""

import glob
import os
import pickle

import numpy as np
import pytest
import torch
from helpers import CONFIGS  # noqa: E402

COCO_CONFIGS = sorted(
    p
    for folder in ("coco", "coco-voc-nonvoc")
    for p in glob.glob(os.path.join(CONFIGS, folder, "*.yaml"))
    if not os.path.basename(p).startswith("Base-")
)
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

pytestmark = pytest.mark.detectron2


def fake_imagenet_c2_checkpoint(depth: int, shapes_of) -> dict:
    """An MSRA ImageNet ResNet .pkl as detectron2's model zoo has it, with random values.

    Args:
        depth: 50 or 101.
        shapes_of: maps a detectron2 key (after renaming) to its shape in the model.
    """
    from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

    names = ["conv1_w", "res_conv1_bn_s", "res_conv1_bn_b", "fc1000_w", "fc1000_b"]
    for stage, blocks in zip(range(2, 6), BLOCKS[depth]):
        for block in range(blocks):
            branches = ["branch2a", "branch2b", "branch2c"] + (["branch1"] if block == 0 else [])
            for branch in branches:
                prefix = f"res{stage}_{block}_{branch}"
                names += [f"{prefix}_w", f"{prefix}_bn_s", f"{prefix}_bn_b"]
    renamed, original = convert_c2_detectron_names({n: np.zeros(1) for n in names})
    generator = np.random.default_rng(0)
    blobs = {}
    for key in renamed:
        shape = (1000, 2048) if key.startswith("fc1000") else shapes_of(key)
        shape = shape[:1] if key == "fc1000.bias" else shape
        blobs[original[key]] = generator.standard_normal(shape).astype(np.float32)
    return blobs


@pytest.mark.detectron2
@pytest.mark.parametrize("config", COCO_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_coco_config_starts_from_an_imagenet_checkpoint(config, tmp_path):
    from detectron2.modeling import build_model

    from masklab_d2.config import load_config
    from masklab_d2.modeling import MaskLabCheckpointer
    from masklab_d2.utils.detectron2 import point_rend_available

    if "point_rend" in os.path.basename(config) and not point_rend_available():
        pytest.skip("detectron2.projects.point_rend is not importable (README: Heads, PointRend)")
    cfg = load_config(config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    state = model.state_dict()

    def shapes_of(key):
        matches = [k for k in state if k.endswith("." + key)]
        assert matches, f"checkpoint key {key} matches nothing in the model"
        return tuple(state[matches[0]].shape)

    blobs = fake_imagenet_c2_checkpoint(cfg.MODEL.RESNETS.DEPTH, shapes_of)
    path = str(tmp_path / "R-fake.pkl")
    with open(path, "wb") as f:
        pickle.dump(blobs, f)
    checkpointer = MaskLabCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(path))

    trunk = ("res2", "res3", "res4", "res5", "stem")
    missing = [
        k for k in incompatible.missing_keys if any(f".{part}." in f".{k}" for part in trunk)
    ]
    assert not missing, f"ResNet weights not loaded: {missing[:5]}"
    loaded = model.state_dict()
    conv = blobs["res5_0_branch2a_w"]
    copies = [k for k in loaded if k.endswith("res5.0.conv1.weight")]
    assert copies, "the model has no res5"
    for key in copies:  # the backbone's res5 and, for C4, the box classifier's duplicate
        assert torch.equal(loaded[key], torch.from_numpy(conv)), key
    if cfg.MODEL.ROI_BOX_HEAD.NAME == "Res5BoxHead":
        assert len(copies) == 2


@pytest.mark.detectron2
def test_train_net_saves_and_loads_through_masklab_checkpointer(tmp_path):
    from detectron2.engine import hooks
    from helpers import tiny_cfg

    import train_net
    from masklab_d2.modeling import MaskLabCheckpointer

    cfg = tiny_cfg("shapes/mask_rcnn_R_18_FPN.yaml", OUTPUT_DIR=str(tmp_path))
    trainer = train_net.Trainer(cfg)
    assert isinstance(trainer.checkpointer, MaskLabCheckpointer)
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert periodic and periodic[0].checkpointer is trainer.checkpointer
