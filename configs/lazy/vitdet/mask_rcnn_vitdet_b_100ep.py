# Mask R-CNN's 4-conv head (with ViTDet's LN), ViTDet ViT-B, COCO: ViTDet's own model.
from ..common.vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train
