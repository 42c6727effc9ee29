# Mask R-CNN's 4-conv head, voc -> nonvoc: masks for the "voc" shapes only, class-agnostic, the
# mask branch trained on ground-truth boxes (configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml).
from ..common.shapes import dataloader, lr_multiplier, model, optimizer, train

dataloader.mask_train_classes = "voc"
model.roi_heads.mask_head.num_classes = 1
model.roi_heads.train_mask_on_gt_boxes = True
train.output_dir = "output/lazy/shapes-partial/mask_rcnn_R_18_FPN_gtcrop"
