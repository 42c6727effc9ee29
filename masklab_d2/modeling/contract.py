"""The mask-head contract: what the project asks of a mask head besides detectron2's call.

detectron2 builds a mask head from ``ROI_MASK_HEAD_REGISTRY`` and calls it as
``head(x, instances)``: ``x`` the pooled crops [R, C, P, P] (``ROI_MASK_HEAD.POOLER_TYPE`` set) or
the feature maps by name (``POOLER_TYPE: ""``, a head that crops for itself); in training it
returns a dict of losses, at inference ``instances`` with ``pred_masks`` [R_i, 1, M, M]
probabilities. :class:`~masklab_d2.modeling.PartialROIHeads`, the lazy helpers, ``visualize``
and the tests ask three more things of a head, and ask them only here:

* :func:`class_agnostic`: whether it predicts one mask for every class (the partially
  supervised configs need one: a class without masks would read an untrained channel);
* :func:`uses_image_targets`: whether, in training, it also takes ``gt_instances=``, every
  ground-truth instance of each image (``gt_has_mask`` marks those with a mask), for dense
  auxiliary losses;
* :func:`recording`: a context manager; while inside, the head's forward calls put what they
  computed besides the masks (detached) into the dict it yields, for the pictures.

A head of the project answers them by subclassing :class:`MaskHeadContract`. detectron2's
Mask R-CNN heads (``BaseMaskRCNNHead`` with a conv ``predictor``, e.g.
``MaskRCNNConvUpsampleHead``) are answered from what they are; any other head must subclass
it (docs/bring_your_own_head.md).
"""

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn

__all__ = ["MaskHeadContract", "class_agnostic", "recording", "uses_image_targets"]


class MaskHeadContract:
    """Mixin of the project's mask heads (module docstring); put it before ``nn.Module``.

    Attributes:
        uses_image_targets (bool): the head takes ``gt_instances`` in training (class default:
            False; a head may set it per instance).
    """

    uses_image_targets: bool = False
    _record: Optional[Dict[str, Any]] = None

    @property
    def class_agnostic(self) -> bool:
        """Whether the head predicts one mask for every class."""
        raise NotImplementedError(f"{type(self).__name__} must define class_agnostic")

    @contextlib.contextmanager
    def recording(self) -> Iterator[Dict[str, Any]]:
        """Collects what forward calls :meth:`remember` while inside (the latest call's).

        Yields:
            name -> detached tensor (or what the head records), filled by the forward calls.
        """
        record: Dict[str, Any] = {}
        self._record = record
        try:
            yield record
        finally:
            self._record = None

    def remember(self, **values) -> None:
        """Records ``values`` (tensors are detached; None is skipped) when recording."""
        if self._record is None:
            return
        for name, value in values.items():
            if value is not None:
                self._record[name] = value.detach() if isinstance(value, torch.Tensor) else value


def _mask_rcnn_predictor(head: nn.Module) -> Optional[nn.Module]:
    """detectron2's Mask R-CNN heads end in a conv ``predictor`` with one channel per mask class."""
    from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead

    predictor = getattr(head, "predictor", None)
    if isinstance(head, BaseMaskRCNNHead) and isinstance(predictor, nn.Conv2d):
        return predictor
    return None


def class_agnostic(head: nn.Module) -> bool:
    """Whether ``head`` predicts one mask for every class.

    Raises:
        TypeError: for a head that neither follows the contract nor is a Mask R-CNN head.
    """
    if isinstance(head, MaskHeadContract):
        return head.class_agnostic
    predictor = _mask_rcnn_predictor(head)
    if predictor is not None:
        return predictor.out_channels == 1
    raise TypeError(
        f"{type(head).__name__} does not say whether it is class-agnostic: subclass "
        "masklab_d2.modeling.MaskHeadContract (docs/bring_your_own_head.md)"
    )


def uses_image_targets(head: nn.Module) -> bool:
    """Whether ``head`` takes ``gt_instances`` (all ground truth per image) in training."""
    return isinstance(head, MaskHeadContract) and bool(head.uses_image_targets)


def recording(head: Optional[nn.Module]) -> "contextlib.AbstractContextManager[Dict[str, Any]]":
    """``head.recording()`` for a head of the contract; an empty record for any other head."""
    if isinstance(head, MaskHeadContract):
        return head.recording()
    return contextlib.nullcontext({})
