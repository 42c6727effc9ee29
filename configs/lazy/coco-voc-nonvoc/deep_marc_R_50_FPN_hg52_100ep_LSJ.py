# Deep-MARC's Hourglass-52 head (nc 64, 32 -> 64 px), VOC -> non-VOC on the LSJ R-50-FPN
# detector (SyncBN): the paper's setting on the stronger detector.
from masklab_d2.lazy import use_deep_marc_head

from ..common.coco_lsj_voc_to_nonvoc import dataloader, lr_multiplier, model, optimizer, train

use_deep_marc_head(model, norm="SyncBN")
train.output_dir = "output/lazy/coco-voc-nonvoc/deep_marc_R_50_FPN_hg52_100ep_LSJ"
