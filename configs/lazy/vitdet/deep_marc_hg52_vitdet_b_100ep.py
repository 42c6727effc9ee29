# Deep-MARC's Hourglass-52 head (nc 64, 32 -> 64 px, class-agnostic, ground-truth boxes) on
# ViTDet ViT-B, COCO. GroupNorm: ViTDet normalises its heads per sample (LN), and GN is the
# per-sample norm the hourglass offers.
from masklab_d2.lazy import use_deep_marc_head

from ..common.vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

use_deep_marc_head(model, norm="GN")
train.output_dir = "output/lazy/vitdet/deep_marc_hg52_vitdet_b_100ep"
