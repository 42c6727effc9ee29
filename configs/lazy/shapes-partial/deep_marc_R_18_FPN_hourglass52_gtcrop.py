# Deep-MARC's Hourglass-52, voc -> nonvoc, class-agnostic, ground-truth boxes
# (configs/shapes-partial/deep_marc_R_18_FPN_hourglass52_gtcrop.yaml): nc 32 on 16 x 16 crops.
from masklab_d2.lazy import use_deep_marc_head

from ..common.shapes import dataloader, lr_multiplier, model, optimizer, train

dataloader.mask_train_classes = "voc"
use_deep_marc_head(model, network="hourglass52", num_filters=32, resolution=16)
train.output_dir = "output/lazy/shapes-partial/deep_marc_R_18_FPN_hourglass52_gtcrop"
