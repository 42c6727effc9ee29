# The LSJ R-50-FPN detector of coco_lsj.py, partially supervised: boxes for all 80 COCO classes,
# masks for the 20 VOC classes only, class-agnostic masks trained on ground-truth boxes
# (Deep-MARC's protocol). Mask AP is reported on seen (VOC) and unseen (non-VOC) classes.
from .coco_lsj import dataloader, lr_multiplier, model, optimizer, train

dataloader.mask_train_classes = "voc"
model.roi_heads.train_mask_on_gt_boxes = True
model.roi_heads.mask_head.num_classes = 1
train.output_dir = "output/lazy/coco-voc-nonvoc/mask_rcnn_R_50_FPN_100ep_LSJ"
