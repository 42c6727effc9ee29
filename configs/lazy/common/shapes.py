# The shapes model, data and schedule of configs/shapes/Base-Shapes.yaml as a LazyConfig:
# detectron2's mask_rcnn_fpn with a slim R-18 (32-64-128-256 channels, BatchNorm) from scratch,
# a 64-channel FPN, smaller RPN / ROI batches, crop-and-resize poolers, PartialROIHeads (at most
# 16 mask-training proposals per image), 256 px shapes images, AdamW at 1e-3 for 3000 iterations
# then 1e-4 for 600, PreciseBN before each evaluation. The same network as the YAML configs:
# same parameters, same losses.
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from masklab_d2.lazy import (
    crop_and_resize_poolers,
    hypercolumn_resnet,
    partial_roi_heads,
    partial_supervision,
    use_mask_rcnn_head,
)

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
# detectron2's YAML default (the YAML shapes configs keep it): mean subtraction only.
model.pixel_std = [1.0, 1.0, 1.0]
model.backbone.bottom_up = L(hypercolumn_resnet)(
    depth=18,
    norm="BN",
    stem_out_channels=32,
    res2_out_channels=32,
    out_features=["res2", "res3", "res4", "res5"],
    freeze_at=0,
)
model.backbone.out_channels = 64
model.proposal_generator.head.in_channels = 64
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.batch_size_per_image = 128
model.proposal_generator.pre_nms_topk = (600, 500)
model.proposal_generator.post_nms_topk = (300, 300)
model.roi_heads.num_classes = 16
model.roi_heads.batch_size_per_image = 128
model.roi_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.box_predictor.test_topk_per_image = 50
use_mask_rcnn_head(model, conv_dims=[64] * 5)
crop_and_resize_poolers(model)
partial_roi_heads(model, max_mask_rois_per_image=16)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset.names = "shapes_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(256,), max_size=256, sample_style="choice"),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=256, max_size=256)
]
dataloader.test.num_workers = 1
partial_supervision(dataloader, "all")

train = model_zoo.get_config("common/train.py").train
train.max_iter = 3600
train.eval_period = 900
train.checkpointer.period = 900
train.output_dir = "output/lazy/shapes"
train.seed = 0  # seeded, so a detector (and its curve) can be reproduced
train.device = "auto"  # the GPU where there is one, else the CPU (these configs run on both)
# Every BatchNorm is evaluated with statistics recomputed on 100 training batches, so no head's
# numbers depend on its BN momentum (as Base-Shapes.yaml's TEST.PRECISE_BN).
train.precise_bn = dict(enabled=True, num_iter=100)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 0.001
optimizer.weight_decay = 0.0001

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1], milestones=[3000], num_updates=train.max_iter
    ),
    warmup_length=200 / train.max_iter,
    warmup_factor=0.001,
)
