"""Lazy data pieces: partial mask supervision in a LazyConfig ``dataloader``.

:func:`partial_supervision` turns detectron2's LazyConfig dataloader (``configs/common/data/
coco.py`` and the LSJ / ViTDet variants built on it) into masklab_d2's protocol, as the YAML path
has it: one selection, ``dataloader.mask_train_classes``, decides

* which training annotations keep their masks (:class:`~masklab_d2.data.PartialMaskDatasetMapper`
  gives every instance ``gt_has_mask``; the others keep their boxes),
* the check that some training annotation of the selection has a mask
  (:func:`~masklab_d2.data.supervision.checked_detection_dataset_dicts`, which the YAML trainer
  calls too), and
* the evaluator's seen / unseen groups (:class:`~masklab_d2.evaluation.PartialCOCOEvaluator`).

Override it on the command line like any key: ``dataloader.mask_train_classes=nonvoc``.
"""

from detectron2.config import LazyCall as L

from masklab_d2.data import PartialMaskDatasetMapper
from masklab_d2.data.class_groups import ALL_CLASSES
from masklab_d2.data.supervision import checked_detection_dataset_dicts, mask_class_ids
from masklab_d2.evaluation import PartialCOCOEvaluator

__all__ = ["checked_detection_dataset_dicts", "mask_class_ids", "partial_supervision"]


def partial_supervision(dataloader, mask_train_classes: str = ALL_CLASSES):
    """Makes a detectron2 LazyConfig dataloader follow masklab_d2's partial-mask protocol.

    Edits in place, keeping every other argument (augmentations, image format, batch size):
    the train and test mappers become :class:`PartialMaskDatasetMapper`, the train dataset is
    checked (:func:`checked_detection_dataset_dicts`) and the evaluator becomes
    :class:`PartialCOCOEvaluator`. All of them read ``dataloader.mask_train_classes``.

    Args:
        dataloader: a node with ``train`` (build_detection_train_loader with ``dataset`` and a
            DatasetMapper), ``test`` and ``evaluator`` (a COCOEvaluator), as detectron2's.
        mask_train_classes: "all" (full supervision, seen / unseen / named groups reported),
            a class group such as "voc", or comma-separated groups and names.

    Returns:
        ``dataloader``.
    """
    dataloader.mask_train_classes = mask_train_classes
    train = dataloader.train
    train.dataset._target_ = checked_detection_dataset_dicts
    train.dataset.mask_train_classes = "${...mask_train_classes}"
    train.mapper._target_ = PartialMaskDatasetMapper
    train.mapper.mask_class_ids = L(mask_class_ids)(
        selection="${....mask_train_classes}", dataset_names="${...dataset.names}"
    )
    # The test mapper needs no selection; it names unreadable images in its error.
    dataloader.test.mapper._target_ = PartialMaskDatasetMapper
    dataloader.evaluator._target_ = PartialCOCOEvaluator
    dataloader.evaluator.mask_train_classes = "${..mask_train_classes}"
    return dataloader
