# detectron2's PointRend mask head (see ../coco/point_rend_R_50_FPN_100ep_LSJ.py), VOC -> non-VOC
# on the LSJ R-50-FPN detector: class-agnostic coarse and point heads trained on ground-truth boxes.
from masklab_d2.lazy import use_point_rend_head

from ..common.coco_lsj_voc_to_nonvoc import dataloader, lr_multiplier, model, optimizer, train

use_point_rend_head(model, cls_agnostic=True)
# PointRend samples its point labels from bitmasks.
dataloader.train.mapper.instance_mask_format = "bitmask"
train.output_dir = "output/lazy/coco-voc-nonvoc/point_rend_R_50_FPN_100ep_LSJ"
