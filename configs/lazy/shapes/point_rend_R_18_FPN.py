# detectron2's PointRend mask head on shapes, every class with masks: per-class masks trained on
# foreground proposals, sized as configs/shapes/point_rend_R_18_FPN.yaml (2 FCs of 256 -> 7x7
# coarse masks, a point head of 3 FCs of 64, subdivision 14 -> 56 with 196 points per step).
from masklab_d2.lazy import use_point_rend_head

from ..common.shapes import dataloader, lr_multiplier, model, optimizer, train

use_point_rend_head(
    model,
    roi_mask_head=dict(conv_dim=64, fc_dim=256),
    point_head=dict(fc_dim=64, subdivision_steps=3, subdivision_num_points=196),
)
train.output_dir = "output/lazy/shapes/point_rend_R_18_FPN"
