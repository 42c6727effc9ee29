# BlendMask's blender, VOC -> non-VOC on the LSJ R-50-FPN detector, ground-truth boxes; its
# semantic loss ignores the boxes of non-VOC instances.
from masklab_d2.lazy import use_blendmask_head

from ..common.coco_lsj_voc_to_nonvoc import dataloader, lr_multiplier, model, optimizer, train

use_blendmask_head(model, norm="SyncBN")
train.output_dir = "output/lazy/coco-voc-nonvoc/blendmask_R_50_FPN_100ep_LSJ"
