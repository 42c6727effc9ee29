# Mask R-CNN's 4-conv head (detectron2's LSJ baseline as it is), COCO, every class with masks.
from ..common.coco_lsj import dataloader, lr_multiplier, model, optimizer, train
