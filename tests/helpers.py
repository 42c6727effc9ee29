"""Shared test helpers: paths, subprocess runs, small detectron2 configs and hand-made ground
truth.

Importable without detectron2; the helpers that build detectron2 objects import it when called
(from tests that skip without it).
"""

import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


# train_net.py options for a tiny run: the 64 / 32-image shapes splits at 128 px, batch 2, no
# loader workers, 32 RoIs per image, on the CPU, seeded; later options override them.
TINY_YAML_OPTS = (
    "DATASETS.TRAIN ('shapes_tiny_train',) DATASETS.TEST ('shapes_tiny_val',) "
    "INPUT.MIN_SIZE_TRAIN (128,) INPUT.MAX_SIZE_TRAIN 128 INPUT.MIN_SIZE_TEST 128 "
    "INPUT.MAX_SIZE_TEST 128 SOLVER.IMS_PER_BATCH 2 DATALOADER.NUM_WORKERS 0 "
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32 MODEL.DEVICE cpu SEED 0"
).split()
# The same for the LazyConfig shapes configs (key=value); five detections per image, whatever
# their score (an untrained model's may all fall below the usual 0.05).
TINY_LAZY_OPTS = [
    "dataloader.train.dataset.names=shapes_tiny_train",
    "dataloader.test.dataset.names=shapes_tiny_val",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[128]",
    "dataloader.train.mapper.augmentations.0.max_size=128",
    "dataloader.test.mapper.augmentations.0.short_edge_length=128",
    "dataloader.test.mapper.augmentations.0.max_size=128",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "model.roi_heads.batch_size_per_image=32",
    "model.proposal_generator.post_nms_topk=[100,50]",
    "model.roi_heads.box_predictor.test_topk_per_image=5",
    "model.roi_heads.box_predictor.test_score_thresh=0.0",
    "train.seed=0",
    "train.device=cpu",
]


def run_python(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python *args`` from the repository root on one thread; stdout and stderr together in
    ``.stdout``."""
    return subprocess.run(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=REPO,
    )


def tiny_cfg(config_file: str, **overrides):
    """A config (path, or relative to configs/) shrunk for fast CPU tests.

    128 px images, the 64 / 32-image shapes splits, batch 2, no loader workers, CPU, random
    weights; ``overrides`` are "KEY": value pairs applied last.
    """
    if not os.path.isabs(config_file):
        config_file = os.path.join(CONFIGS, config_file)
    from masklab_d2.config import load_config

    cfg = load_config(config_file)
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.WEIGHTS",
            "",
            "DATASETS.TRAIN",
            ("shapes_tiny_train",),
            "DATASETS.TEST",
            ("shapes_tiny_val",),
            "INPUT.MIN_SIZE_TRAIN",
            (128,),
            "INPUT.MAX_SIZE_TRAIN",
            128,
            "INPUT.MIN_SIZE_TEST",
            128,
            "INPUT.MAX_SIZE_TEST",
            128,
            "SOLVER.IMS_PER_BATCH",
            2,
            "DATALOADER.NUM_WORKERS",
            0,
            "SEED",
            0,
        ]
    )
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


def image_instances(height: int = 96, width: int = 96, polygons: bool = False):
    """Ground truth of one image: a masked square (class 0) and a mask-less box (class 9).

    The mask-less instance carries the placeholder the mapper gives it (an empty bitmask, or
    its box as a polygon).
    """
    from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

    instances = Instances((height, width))
    instances.gt_boxes = Boxes(torch.tensor([[12.0, 10.0, 44.0, 40.0], [50.0, 52.0, 90.0, 88.0]]))
    instances.gt_classes = torch.tensor([0, 9])
    if polygons:
        square = [12.0, 10.0, 44.0, 10.0, 44.0, 40.0, 12.0, 40.0]
        box = [50.0, 52.0, 90.0, 52.0, 90.0, 88.0, 50.0, 88.0]
        instances.gt_masks = PolygonMasks([[square], [box]])
    else:
        masks = torch.zeros(2, height, width, dtype=torch.bool)
        masks[0, 10:40, 12:44] = True
        instances.gt_masks = BitMasks(masks)
    instances.gt_has_mask = torch.tensor([True, False])
    return instances


# ----------------------------------------------------------------------------------------------
# Random [K, 5] rois (batch index, x1, y1, x2, y2) for the op tests, seeded by ``generator``:
# awkward_rois (every awkward kind, the CPU op tests), regular_rois (regular boxes, some partly
# outside, over chosen images: the backends), wide_rois (inside, across and far outside the map,
# zero-size and flipped: CPU against CUDA).


def awkward_rois(num_boxes, batch_size, extent, generator, dtype=torch.float64):
    """Boxes of every awkward kind: regular, zero-size, flipped, partly and wholly outside, sub-pixel."""
    kinds = []
    for i in range(num_boxes):
        x1, y1 = (torch.rand(2, generator=generator, dtype=dtype) * extent).tolist()
        w, h = (torch.rand(2, generator=generator, dtype=dtype) * extent / 2 + 1).tolist()
        kind = i % 6
        if kind == 1:  # zero size
            w = h = 0.0
        elif kind == 2:  # flipped in x and y
            w, h = -w, -h
        elif kind == 3:  # partly outside
            x1, y1 = x1 - extent / 2, y1 + extent / 2
        elif kind == 4:  # wholly outside
            x1, y1 = x1 + 2 * extent, y1 - 3 * extent
        elif kind == 5:  # sub-pixel
            w, h = w / extent, h / extent
        kinds.append([float(i % batch_size), x1, y1, x1 + w, y1 + h])
    return torch.tensor(kinds, dtype=dtype).reshape(-1, 5)


def regular_rois(num_boxes, batch_size, extent, generator, dtype=torch.float64, images=None):
    """Regular boxes, some partly outside the map, spread over ``images`` (default: all)."""
    images = list(range(batch_size)) if images is None else images
    xy = torch.rand(num_boxes, 2, generator=generator, dtype=dtype) * extent - extent / 8
    wh = torch.rand(num_boxes, 2, generator=generator, dtype=dtype) * extent / 2 + 1
    index = torch.tensor([images[i % len(images)] for i in range(num_boxes)], dtype=dtype)
    return torch.cat([index[:, None], xy, xy + wh], dim=1)


def wide_rois(num_boxes, batch_size, extent, generator, dtype=torch.float64):
    """Boxes inside, across and far outside the map, zero-size and flipped."""
    xy = torch.rand(num_boxes, 2, generator=generator, dtype=dtype) * 1.5 * extent - extent / 4
    wh = (torch.rand(num_boxes, 2, generator=generator, dtype=dtype) - 0.2) * extent / 2
    wh[::7] = 0
    index = torch.arange(num_boxes, dtype=dtype)[:, None] % batch_size
    return torch.cat([index, xy, xy + wh], dim=1)
