# Deep-MARC's Hourglass-52 head (nc 64, 32 x 32 ROIAlignV2 crops -> 64 x 64 class-agnostic masks,
# ground-truth-box training) on the LSJ R-50-FPN detector, COCO, every class with masks. SyncBN, as
# the LSJ recipe and the reference (which normalises over the whole batch).
from masklab_d2.lazy import use_deep_marc_head

from ..common.coco_lsj import dataloader, lr_multiplier, model, optimizer, train

use_deep_marc_head(model, norm="SyncBN")
train.output_dir = "output/lazy/coco/deep_marc_R_50_FPN_hg52_100ep_LSJ"
