# detectron2's PointRend mask head, voc -> nonvoc: class-agnostic coarse and point heads trained
# on ground-truth boxes (configs/shapes-partial/point_rend_R_18_FPN_gtcrop.yaml); the shapes
# sizing of ../shapes/point_rend_R_18_FPN.py.
from ..shapes.point_rend_R_18_FPN import dataloader, lr_multiplier, model, optimizer, train

dataloader.mask_train_classes = "voc"
model.roi_heads.mask_head.cls_agnostic = True
model.roi_heads.train_mask_on_gt_boxes = True
train.output_dir = "output/lazy/shapes-partial/point_rend_R_18_FPN_gtcrop"
