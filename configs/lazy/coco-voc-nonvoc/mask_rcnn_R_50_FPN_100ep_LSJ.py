# Mask R-CNN's 4-conv head, VOC -> non-VOC on the LSJ R-50-FPN detector: class-agnostic masks
# trained on ground-truth boxes (Deep-MARC's baseline).
from ..common.coco_lsj_voc_to_nonvoc import dataloader, lr_multiplier, model, optimizer, train
