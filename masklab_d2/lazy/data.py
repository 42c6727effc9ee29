"""Lazy data pieces: partial mask supervision in a LazyConfig ``dataloader``.

:func:`partial_supervision` turns detectron2's LazyConfig dataloader (``configs/common/data/
coco.py`` and the LSJ / ViTDet variants built on it) into masklab_d2's protocol, as the YAML path
has it: one selection, ``dataloader.mask_train_classes``, decides

* which training annotations keep their masks (:class:`~masklab_d2.data.PartialMaskDatasetMapper`
  gives every instance ``gt_has_mask``; the others keep their boxes),
* the check that some training annotation of the selection has a mask
  (:func:`checked_detection_dataset_dicts`), and
* the evaluator's seen / unseen groups (:class:`~masklab_d2.evaluation.PartialCOCOEvaluator`).

Override it on the command line like any key: ``dataloader.mask_train_classes=nonvoc``.
"""

from typing import List, Optional, Sequence, Union

from detectron2.config import LazyCall as L
from detectron2.data import MetadataCatalog, get_detection_dataset_dicts

from masklab_d2.data import PartialMaskDatasetMapper
from masklab_d2.data.class_groups import ALL_CLASSES, class_groups_of, resolve_class_selection
from masklab_d2.data.datasets import check_mask_supervision, ensure_materialized
from masklab_d2.evaluation import PartialCOCOEvaluator

__all__ = ["checked_detection_dataset_dicts", "mask_class_ids", "partial_supervision"]


def _names(dataset_names: Union[str, Sequence[str]]) -> List[str]:
    return [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)


def mask_class_ids(selection: str, dataset_names: Union[str, Sequence[str]]) -> Optional[List[int]]:
    """Contiguous ids of the classes whose masks train, as DATASETS.MASK_TRAIN_CLASSES.

    Args:
        selection: "all", a class group ("voc"), or comma-separated groups and class names.
        dataset_names: the training dataset(s); they must share their classes.

    Returns:
        The ids, or None for "all".

    Raises:
        ValueError: for an unknown name (the message lists the valid ones), or datasets whose
            classes differ.
    """
    if selection.strip() == ALL_CLASSES:
        return None
    names = _names(dataset_names)
    metadata = [ensure_materialized(name) for name in names]
    thing_classes = list(metadata[0].thing_classes)
    for name, meta in zip(names[1:], metadata[1:]):
        if list(meta.thing_classes) != thing_classes:
            raise ValueError(f"datasets {names[0]} and {name} have different classes")
    return resolve_class_selection(selection, thing_classes, class_groups_of(metadata[0]))


def checked_detection_dataset_dicts(
    names: Union[str, Sequence[str]], mask_train_classes: str = ALL_CLASSES, **kwargs
) -> List[dict]:
    """detectron2's ``get_detection_dataset_dicts``, refusing data that would train no mask.

    Args:
        names: the dataset(s).
        mask_train_classes: the selection whose masks train the mask branch.
        kwargs: see ``get_detection_dataset_dicts`` (``filter_empty``, ...).

    Raises:
        ValueError: when no annotation of the selected classes has a mask.
    """
    dataset = get_detection_dataset_dicts(names, **kwargs)
    check_mask_supervision(
        dataset,
        mask_class_ids(mask_train_classes, names),
        mask_train_classes,
        MetadataCatalog.get(_names(names)[0]).get("thing_classes"),
    )
    return dataset


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
