# MaskLab's head on the LSJ R-50-FPN detector, COCO, every class with masks: dense semantic and
# direction logits from p2-p5 merged at stride 4, hypercolumn refinement on conv1 and res2
# (passed through the FPN), 41 x 41 crops; the mask path trains on ground-truth boxes (paper).
from masklab_d2.lazy import use_masklab_head

from ..common.coco_lsj import dataloader, lr_multiplier, model, optimizer, train

use_masklab_head(model)
train.output_dir = "output/lazy/coco/masklab_R_50_FPN_100ep_LSJ"
