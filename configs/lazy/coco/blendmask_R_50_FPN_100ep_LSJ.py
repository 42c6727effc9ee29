# BlendMask's blender as an ROI mask head on the LSJ R-50-FPN detector, COCO, every class with
# masks: 4 bases from p3-p5 at stride 4, 14 x 14 attentions, 56 x 56 class-agnostic masks; SyncBN
# in the bottom module, as the LSJ recipe and AdelaiDet.
from masklab_d2.lazy import use_blendmask_head

from ..common.coco_lsj import dataloader, lr_multiplier, model, optimizer, train

use_blendmask_head(model, norm="SyncBN")
train.output_dir = "output/lazy/coco/blendmask_R_50_FPN_100ep_LSJ"
