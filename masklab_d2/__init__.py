"""masklab_d2: MaskLab, Mask R-CNN, BlendMask and Deep-MARC mask heads for detectron2.

Importing this package needs only torch. The detectron2 parts live in `masklab_d2.modeling`,
`masklab_d2.data`, `masklab_d2.evaluation` and `masklab_d2.config`; importing them registers the
heads, ROI heads, backbones and datasets with detectron2.
"""

__version__ = "0.1.0"
