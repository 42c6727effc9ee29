"""Which classes' masks train the mask branch, and the check that some of them have masks.

One selection (``DATASETS.MASK_TRAIN_CLASSES`` in YAML, ``dataloader.mask_train_classes`` in a
LazyConfig) decides it: "all", a class group ("voc"), or comma-separated groups and class names.
Both config systems call these functions with plain arguments.
"""

import logging
from collections import Counter
from typing import List, Optional, Sequence, Union

from detectron2.data import MetadataCatalog, get_detection_dataset_dicts

from .class_groups import ALL_CLASSES, class_groups_of, resolve_class_selection
from .datasets import ensure_materialized

logger = logging.getLogger(__name__)

__all__ = ["check_mask_supervision", "checked_detection_dataset_dicts", "mask_class_ids"]


def _names(dataset_names: Union[str, Sequence[str]]) -> List[str]:
    return [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)


def mask_class_ids(selection: str, dataset_names: Union[str, Sequence[str]]) -> Optional[List[int]]:
    """Contiguous ids of the classes whose masks train.

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
    names: Union[str, Sequence[str]], mask_train_classes: Optional[str] = ALL_CLASSES, **kwargs
) -> List[dict]:
    """detectron2's ``get_detection_dataset_dicts``, refusing data that would train no mask.

    Args:
        names: the dataset(s).
        mask_train_classes: the selection whose masks train the mask branch; None: a model
            without masks, nothing to check.
        kwargs: see ``get_detection_dataset_dicts`` (``filter_empty``, ...).

    Raises:
        ValueError: when no annotation of the selected classes has a mask.
    """
    dataset = get_detection_dataset_dicts(names, **kwargs)
    if mask_train_classes is not None:
        check_mask_supervision(
            dataset,
            mask_class_ids(mask_train_classes, names),
            mask_train_classes,
            MetadataCatalog.get(_names(names)[0]).get("thing_classes"),
        )
    return dataset


def check_mask_supervision(
    dataset_dicts: List[dict],
    mask_class_ids: Optional[Sequence[int]],
    selection: str,
    class_names=None,
) -> Counter:
    """Counts the masks the mask branch will train on, per contiguous class id.

    Raises ValueError when there are none (no class has masks, or the selected classes have
    none): a mask head would never receive a loss. Warns about selected classes without masks.

    Returns:
        Counter of class id -> number of non-crowd annotations with a segmentation.
    """
    counts = Counter(
        annotation["category_id"]
        for record in dataset_dicts
        for annotation in record.get("annotations", [])
        if annotation.get("iscrowd", 0) == 0 and annotation.get("segmentation")
    )
    selected = set(counts) if mask_class_ids is None else set(mask_class_ids)
    usable = sum(counts[i] for i in selected)
    if usable == 0:
        raise ValueError(
            f"No training annotation has a mask for the mask classes {selection!r} "
            "(DATASETS.MASK_TRAIN_CLASSES; lazy: dataloader.mask_train_classes): the mask head "
            "would never train. Check the dataset's segmentations or the selection."
        )
    if mask_class_ids is not None:
        empty = [class_names[i] if class_names else i for i in sorted(selected) if counts[i] == 0]
        if empty:
            logger.warning(f"Selected mask classes without any mask in the training data: {empty}")
    logger.info(
        f"Mask supervision: {usable} masks over {len([i for i in selected if counts[i]])} classes"
    )
    return counts
