# MaskLab's head, VOC -> non-VOC on the LSJ R-50-FPN detector: one class-agnostic foreground
# semantic channel (a class without masks would crop a channel no mask ever trained).
from masklab_d2.lazy import use_masklab_head

from ..common.coco_lsj_voc_to_nonvoc import dataloader, lr_multiplier, model, optimizer, train

use_masklab_head(model, cls_agnostic=True)
train.output_dir = "output/lazy/coco-voc-nonvoc/masklab_R_50_FPN_100ep_LSJ"
