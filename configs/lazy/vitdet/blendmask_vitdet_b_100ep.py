# BlendMask's blender on ViTDet ViT-B, COCO; GroupNorm in the bottom module (ViTDet normalises
# its heads per sample).
from masklab_d2.lazy import use_blendmask_head

from ..common.vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

use_blendmask_head(model, norm="GN")
train.output_dir = "output/lazy/vitdet/blendmask_vitdet_b_100ep"
