# Mask R-CNN's 4-conv head on shapes, every class with masks (configs/shapes/mask_rcnn_R_18_FPN.yaml).
from ..common.shapes import dataloader, lr_multiplier, model, optimizer, train

train.output_dir = "output/lazy/shapes/mask_rcnn_R_18_FPN"
