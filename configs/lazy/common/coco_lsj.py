# detectron2's R-50-FPN Mask R-CNN, 100 epochs of large-scale jitter (LSJ) on COCO, from scratch
# with SyncBN (detectron2's configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py, unchanged),
# with masklab_d2's PartialROIHeads and partial-supervision data pieces (every class with masks
# here; box AP, mask AP and mask AP on seen / unseen / voc / nonvoc classes are reported).
from detectron2 import model_zoo

from masklab_d2.lazy import partial_roi_heads, partial_supervision

_lsj = model_zoo.get_config("new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py")
dataloader = _lsj.dataloader
model = _lsj.model
optimizer = _lsj.optimizer
train = _lsj.train
lr_multiplier = _lsj.lr_multiplier

partial_roi_heads(model)
partial_supervision(dataloader, "all")
train.output_dir = "output/lazy/coco/mask_rcnn_R_50_FPN_100ep_LSJ"
