"""Records what every shapes head config computes, to show that a refactor changed nothing.

For each config (the YAML shapes / shapes-partial heads and their LazyConfig twins), on the CPU
with one thread and seed 0: the model is built (random weights), the first batch of the config's
own training loader (the tiny shapes split at 128 px) is drawn, and the script records

* every training loss, exactly (``float.hex``),
* the gradient of every parameter (one sha1 over all of them, in name order),
* the inference outputs on the same images (sha1 of boxes, scores, classes and mask
  probabilities), and
* the state-dict keys and shapes (sha1: checkpoints stay loadable).

Run it with the package of two commits first on ``sys.path`` (a worktree of the old commit, with
the compiled ``_C`` copied in) and compare the two files::

    PYTHONPATH=/tmp/before python3 projects/redesign-check/behaviour.py record /tmp/before.json
    python3 projects/redesign-check/behaviour.py record /tmp/after.json
    python3 projects/redesign-check/behaviour.py compare /tmp/before.json /tmp/after.json
"""

import hashlib
import json
import os
import random
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
YAML = [
    "shapes/mask_rcnn_R_18_FPN.yaml",
    "shapes/masklab_R_18_FPN.yaml",
    "shapes/masklab_R_18_C4_os8.yaml",
    "shapes/blendmask_R_18_FPN.yaml",
    "shapes/deep_marc_R_18_FPN_hourglass52.yaml",
    "shapes/point_rend_R_18_FPN.yaml",
    "shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml",
    "shapes-partial/masklab_R_18_FPN_gtcrop.yaml",
    "shapes-partial/blendmask_R_18_FPN_gtcrop.yaml",
    "shapes-partial/deep_marc_R_18_FPN_hourglass52_gtcrop.yaml",
    "shapes-partial/deep_marc_R_18_FPN_resnet16_gtcrop.yaml",
    "shapes-partial/point_rend_R_18_FPN_gtcrop.yaml",
]
LAZY = [
    "lazy/shapes/mask_rcnn_R_18_FPN.py",
    "lazy/shapes/point_rend_R_18_FPN.py",
    "lazy/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.py",
    "lazy/shapes-partial/masklab_R_18_FPN_gtcrop.py",
    "lazy/shapes-partial/blendmask_R_18_FPN_gtcrop.py",
    "lazy/shapes-partial/deep_marc_R_18_FPN_hourglass52_gtcrop.py",
    "lazy/shapes-partial/point_rend_R_18_FPN_gtcrop.py",
]
YAML_OPTS = [
    "DATASETS.TRAIN", "('shapes_tiny_train',)", "INPUT.MIN_SIZE_TRAIN", "(128,)",
    "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "SEED", "0",
]  # fmt: skip
LAZY_OPTS = [
    "dataloader.train.dataset.names=shapes_tiny_train",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
    "dataloader.train.mapper.augmentations.0.max_size=128",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "model.roi_heads.batch_size_per_image=32",
    "train.device=cpu",
]


def _seed(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sha1(tensors) -> str:
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _model_and_batch(config: str):
    path = os.path.join(REPO, "configs", config)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig, instantiate

        cfg = LazyConfig.apply_overrides(LazyConfig.load(path), LAZY_OPTS)
        _seed()
        model = instantiate(cfg.model)
        _seed()
        loader = instantiate(cfg.dataloader.train)
    else:
        from detectron2.modeling import build_model

        from masklab_d2.config import load_config
        from masklab_d2.engine.trainer import Trainer

        cfg = load_config(path, YAML_OPTS)
        _seed()
        model = build_model(cfg)
        _seed()
        loader = Trainer.build_train_loader(cfg)
    batch = next(iter(loader))
    return model, batch


def record(config: str) -> dict:
    """What one config computes (module docstring)."""
    from detectron2.utils.events import EventStorage

    model, batch = _model_and_batch(config)
    model.train()
    _seed()
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    named = sorted((n, p) for n, p in model.named_parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        outputs = model.inference(batch, do_postprocess=False)
    fields = []
    for instances in outputs:
        fields += [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]
        if instances.has("pred_masks"):
            fields.append(instances.pred_masks)
    keys = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return {
        "losses": {k: float(v.detach()).hex() for k, v in sorted(losses.items())},
        "gradients": _sha1(p.grad for _, p in named),
        "parameters_with_gradient": len(named),
        "inference": _sha1(fields),
        "detections": [len(x) for x in outputs],
        "state_dict": hashlib.sha1(repr(keys).encode()).hexdigest(),
    }


def main(argv) -> int:
    if argv[:1] == ["record"] and len(argv) == 2:
        torch.set_num_threads(1)
        import masklab_d2.modeling  # noqa: F401  (registers the heads)

        print("package:", os.path.dirname(masklab_d2.modeling.__file__), file=sys.stderr)
        results = {}
        for config in YAML + LAZY:
            results[config] = record(config)
            print(config, results[config]["losses"], file=sys.stderr)
        with open(argv[1], "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        return 0
    if argv[:1] == ["compare"] and len(argv) == 3:
        before, after = (json.load(open(p)) for p in argv[1:])
        differ = 0
        for config in sorted(set(before) | set(after)):
            same = before.get(config) == after.get(config)
            differ += not same
            print(f"{'identical' if same else 'DIFFERS  '}  {config}")
            if not same:
                for key in sorted(set(before.get(config, {})) | set(after.get(config, {}))):
                    old, new = before.get(config, {}).get(key), after.get(config, {}).get(key)
                    if old != new:
                        print(f"    {key}: {old} -> {new}")
        print(f"{len(set(before) | set(after)) - differ} identical, {differ} differ")
        return 1 if differ else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
