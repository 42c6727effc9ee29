# ViTDet's ViT-B Mask R-CNN, 100 epochs on COCO: detectron2's projects/ViTDet/configs/COCO/
# mask_rcnn_vitdet_b_100ep.py with its LSJ loader (projects/ViTDet/configs/common/
# coco_loader_lsj.py), which pip installs of detectron2 do not ship, written out here; plus
# masklab_d2's PartialROIHeads, partial-supervision data pieces (every class with masks) and
# comparison conventions.
from functools import partial

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from masklab_d2.lazy import partial_roi_heads, partial_supervision

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
partial_roi_heads(model)
# masklab_d2's comparison conventions, as in coco_lsj.py (PreciseBN only acts on BatchNorm,
# which ViTDet's LN model has none of unless a head brings it).
model.roi_heads.mask_pooler.sampling_ratio = 1

# Data using LSJ
image_size = 1024
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first
    L(T.ResizeScale)(
        min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size
    ),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.total_batch_size = 64
# recompute boxes due to cropping
dataloader.train.mapper.recompute_boxes = True
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]
partial_supervision(dataloader, "all")

# Initialization and trainer settings
train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
)
train.output_dir = "output/lazy/vitdet/mask_rcnn_vitdet_b_100ep"
train.precise_bn = dict(enabled=True, num_iter=200)

# Schedule
# 100 ep = 184375 iters * 64 images/iter / 118000 images/ep
train.max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

# Optimizer
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
