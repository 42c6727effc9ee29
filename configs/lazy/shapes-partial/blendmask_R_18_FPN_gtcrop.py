# BlendMask's blender, voc -> nonvoc, ground-truth boxes
# (configs/shapes-partial/blendmask_R_18_FPN_gtcrop.yaml): 32-channel bottom module, 64-channel
# attention convs.
from masklab_d2.lazy import use_blendmask_head

from ..common.shapes import dataloader, lr_multiplier, model, optimizer, train

dataloader.mask_train_classes = "voc"
use_blendmask_head(model, bottom_conv_dim=32, attn_conv_dim=64)
train.output_dir = "output/lazy/shapes-partial/blendmask_R_18_FPN_gtcrop"
