# detectron2's PointRend mask head (its COCO model: 7x7 coarse masks from 14x14 crops of p2, a
# point head of 3 FCs of 256, subdivision to 224x224) on the LSJ R-50-FPN detector, COCO, every
# class with masks: per-class masks trained on foreground proposals, as the 4-conv head's config.
from masklab_d2.lazy import use_point_rend_head

from ..common.coco_lsj import dataloader, lr_multiplier, model, optimizer, train

use_point_rend_head(model)
# PointRend samples its point labels from bitmasks.
dataloader.train.mapper.instance_mask_format = "bitmask"
train.output_dir = "output/lazy/coco/point_rend_R_50_FPN_100ep_LSJ"
