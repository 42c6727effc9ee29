# MaskLab (FPN), voc -> nonvoc (configs/shapes-partial/masklab_R_18_FPN_gtcrop.yaml): one
# class-agnostic foreground semantic channel (a class without masks would crop a channel no mask
# ever trained). CPU sizing as every shapes MaskLab: 21 x 21 crops, 64-channel dense merge,
# 32-filter refinement convs.
from masklab_d2.lazy import use_masklab_head

from ..common.shapes import dataloader, lr_multiplier, model, optimizer, train

dataloader.mask_train_classes = "voc"
use_masklab_head(model, cls_agnostic=True, dense_conv_dim=64, crop_size=21, refine_conv_dim=32)
train.output_dir = "output/lazy/shapes-partial/masklab_R_18_FPN_gtcrop"
