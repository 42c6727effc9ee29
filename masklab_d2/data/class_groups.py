"""Named class groups and the parsing of class selections such as DATASETS.MASK_TRAIN_CLASSES.

A dataset's groups come from its metadata (``metadata.class_groups``, a dict of group name to
class names); datasets with COCO's 80 categories get COCO's VOC / non-VOC split automatically.
Nothing here imports detectron2: metadata is read by attribute.
"""

from typing import Dict, List, Sequence

# COCO category ids of the 20 PASCAL VOC classes (the "seen" split of the VOC -> non-VOC
# benchmark of Hu et al. 2018, used by Deep-MARC); the other 60 COCO classes are "non-VOC".
COCO_VOC_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72)
COCO_NUM_CATEGORIES = 80

ALL_CLASSES = "all"


def coco_class_groups(dataset_id_to_contiguous_id: Dict[int, int], thing_classes: Sequence[str]):
    """COCO's "voc" and "nonvoc" groups, as class names, for a dataset with COCO's 80 ids."""
    contiguous_to_dataset = {v: k for k, v in dataset_id_to_contiguous_id.items()}
    voc = [
        name
        for index, name in enumerate(thing_classes)
        if contiguous_to_dataset[index] in COCO_VOC_CATEGORY_IDS
    ]
    return {"voc": voc, "nonvoc": [name for name in thing_classes if name not in voc]}


def class_groups_of(metadata) -> Dict[str, List[str]]:
    """The named class groups of a dataset, from its metadata (see the module docstring)."""
    groups = getattr(metadata, "class_groups", None)
    if groups:
        return {name: list(classes) for name, classes in groups.items()}
    id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    thing_classes = getattr(metadata, "thing_classes", None)
    if (
        id_map
        and thing_classes
        and len(id_map) == COCO_NUM_CATEGORIES
        and set(COCO_VOC_CATEGORY_IDS) <= set(id_map)
        and max(id_map) == 90
    ):
        return coco_class_groups(id_map, thing_classes)
    return {}


def resolve_class_selection(
    selection: str,
    thing_classes: Sequence[str],
    class_groups: Dict[str, Sequence[str]],
    what: str = "DATASETS.MASK_TRAIN_CLASSES",
) -> List[int]:
    """Contiguous class ids selected by "all", a group name or comma-separated names.

    Tokens may mix class names and group names ("voc,frame"). Raises ValueError naming the
    unknown tokens and the valid choices.

    Returns:
        Sorted contiguous ids (indices into ``thing_classes``).
    """
    if not isinstance(selection, str):
        raise ValueError(f"{what} must be a string, got {selection!r}")
    tokens = [token.strip() for token in selection.split(",") if token.strip()]
    if not tokens:
        raise ValueError(f"{what} is empty; use 'all', a class group or class names")
    if tokens == [ALL_CLASSES]:
        return list(range(len(thing_classes)))
    index = {name: i for i, name in enumerate(thing_classes)}
    selected, unknown = set(), []
    for token in tokens:
        if token in class_groups:
            selected.update(index[name] for name in class_groups[token])
        elif token in index:
            selected.add(index[token])
        else:
            unknown.append(token)
    if unknown:
        raise ValueError(
            f"{what}={selection!r}: unknown class or group name(s) {unknown}. Valid: "
            f"'{ALL_CLASSES}', groups {sorted(class_groups)}, classes {list(thing_classes)}"
        )
    return sorted(selected)
