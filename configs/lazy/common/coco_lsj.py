# detectron2's R-50-FPN Mask R-CNN, 100 epochs of large-scale jitter (LSJ) on COCO, from scratch
# with SyncBN (detectron2's configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py, unchanged),
# with masklab_d2's PartialROIHeads, partial-supervision data pieces (every class with masks
# here; box AP, mask AP and mask AP on seen / unseen / voc / nonvoc classes are reported) and
# comparison conventions.
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
# masklab_d2's comparison conventions (configs/coco/Base-COCO-R50-FPN-1x.yaml): one sample per
# bin for every head's mask crops, as MaskLab's and BlendMask's own crops; PreciseBN before each
# evaluation, so no head's numbers depend on its BN momentum.
model.roi_heads.mask_pooler.sampling_ratio = 1
train.precise_bn = dict(enabled=True, num_iter=200)
train.output_dir = "output/lazy/coco/mask_rcnn_R_50_FPN_100ep_LSJ"
