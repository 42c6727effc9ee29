# MaskLab's head on ViTDet ViT-B, COCO. A plain ViT has no conv1 / res2: the refinement crops the
# simple pyramid's p2 (stride 4, the finest map there is); LN in the dense merge convs, as
# ViTDet normalises its heads.
from masklab_d2.lazy import use_masklab_head

from ..common.vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

use_masklab_head(model, hypercolumn_features=["p2"], dense_norm="LN")
train.output_dir = "output/lazy/vitdet/masklab_vitdet_b_100ep"
