"""Tests of the synthetic shapes dataset generator, `masklab_d2/data/shapes.py`.

The module is loaded from its file rather than as `masklab_d2.data.shapes`: importing the
`masklab_d2.data` package registers detectron2 datasets, and these tests must run without
detectron2.
"""

import ast
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPES_PATH = REPO_ROOT / "masklab_d2" / "data" / "shapes.py"
from conftest import HAS_DETECTRON2  # noqa: E402


def _load_shapes():
    name = "masklab_d2_shapes_standalone"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SHAPES_PATH)
        module = importlib.util.module_from_spec(spec)
        # Registered before running it, so pool workers can find its functions by module name.
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


shapes = _load_shapes()

# pycocotools' decode trips a NumPy 2 deprecation inside its compiled code; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _load_json(json_path):
    with open(json_path) as json_file:
        return json.load(json_file)


def _masks_by_image(dataset):
    masks = {image["id"]: [] for image in dataset["images"]}
    for annotation in dataset["annotations"]:
        masks[annotation["image_id"]].append(
            (annotation, mask_util.decode(annotation["segmentation"]).astype(bool))
        )
    return masks


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    """The 64-image tiny_train split, generated once for the tests that inspect content."""
    json_path, image_root = shapes.ensure_split(
        "tiny_train", root=str(tmp_path_factory.mktemp("s"))
    )
    return _load_json(json_path), image_root


def test_module_imports_neither_detectron2_nor_the_package():
    tree = ast.parse(SHAPES_PATH.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import would pull in the masklab_d2.data package"
            imported.add(node.module.split(".")[0])
    assert not imported & {"detectron2", "torch", "masklab_d2"}, imported


def test_categories_and_groups_are_stable():
    expected = [
        "circle", "triangle", "square", "star", "ring", "cross", "heart", "arrow",
        "pentagon", "hexagon", "semicircle", "frame", "crescent", "l_shape", "t_shape", "chevron",
    ]  # fmt: skip
    assert [c["id"] for c in shapes.SHAPES_CATEGORIES] == list(range(1, 17))
    assert [c["name"] for c in shapes.SHAPES_CATEGORIES] == expected
    assert shapes.SHAPES_CLASS_GROUPS == {"voc": expected[:8], "nonvoc": expected[8:]}
    for category in shapes.SHAPES_CATEGORIES:
        group = "voc" if category["id"] <= 8 else "nonvoc"
        assert category["supercategory"] == group
    assert shapes.SPLITS == {
        "train": (2000, 1),
        "val": (500, 2),
        "tiny_train": (64, 3),
        "tiny_val": (32, 4),
        "test": (500, 5),
    }


def test_the_test_split_is_val_with_its_own_images():
    # Same size and generator as val, other images: nothing chosen on val is measured on test.
    assert shapes.SPLITS["test"][0] == shapes.SPLITS["val"][0]
    assert len({seed for _, seed in shapes.SPLITS.values()}) == len(shapes.SPLITS)
    for index in range(3):
        test_image, test_annotations = shapes._render_image(shapes.SPLITS["test"][1], index, 256)
        val_image, _ = shapes._render_image(shapes.SPLITS["val"][1], index, 256)
        assert test_image.shape == val_image.shape == (256, 256, 3)
        assert not np.array_equal(test_image, val_image) and test_annotations


def test_default_root_and_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("MASKLAB_SHAPES_DIR", str(tmp_path))
    assert shapes.default_root() == str(tmp_path)
    monkeypatch.delenv("MASKLAB_SHAPES_DIR")
    assert shapes.default_root() == os.path.expanduser("~/.cache/masklab_d2/shapes")
    with pytest.raises(KeyError):
        shapes.ensure_split("no_such_split", root=str(tmp_path))


def _split_bytes(out_dir):
    images = {path.name: path.read_bytes() for path in sorted((out_dir / "images").iterdir())}
    return (out_dir / "annotations.json").read_bytes(), images


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
    # 48 images reach the multiprocessing path, so serial and pooled runs are compared.
    count = shapes._MIN_IMAGES_FOR_POOL
    shapes.generate_split(str(tmp_path / "serial"), count, seed=7, num_workers=1)
    shapes.generate_split(str(tmp_path / "pooled"), count, seed=7, num_workers=2)
    shapes.generate_split(str(tmp_path / "again"), count, seed=7, num_workers=1)
    serial = _split_bytes(tmp_path / "serial")
    assert serial == _split_bytes(tmp_path / "pooled")
    assert serial == _split_bytes(tmp_path / "again")
    assert len(serial[1]) == count

    shapes.generate_split(str(tmp_path / "other_seed"), 4, seed=8, num_workers=1)
    other_json, other_images = _split_bytes(tmp_path / "other_seed")
    assert other_json != serial[0]
    assert all(other_images[name] != serial[1][name] for name in other_images)


def test_all_classes_appear(tiny_train):
    dataset, _ = tiny_train
    assert dataset["categories"] == shapes.SHAPES_CATEGORIES
    assert {a["category_id"] for a in dataset["annotations"]} == set(range(1, 17))


def test_annotations_match_their_masks(tiny_train):
    dataset, image_root = tiny_train
    assert len(dataset["images"]) == 64
    annotation_ids = [a["id"] for a in dataset["annotations"]]
    assert len(set(annotation_ids)) == len(annotation_ids)
    for image in dataset["images"]:
        assert (image["height"], image["width"]) == (256, 256)
        pixels = cv2.imread(os.path.join(image_root, image["file_name"]))
        assert pixels is not None and pixels.shape == (256, 256, 3)

    counts = []
    for image_id, items in _masks_by_image(dataset).items():
        counts.append(len(items))
        coverage = np.zeros((256, 256), np.int32)
        for annotation, mask in items:
            rows, cols = np.nonzero(mask)
            tight_box = [cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1]
            assert annotation["area"] == mask.sum() >= 20
            assert annotation["bbox"] == [float(value) for value in tight_box]
            assert annotation["iscrowd"] == 0
            assert 1 <= annotation["category_id"] <= 16
            coverage += mask
        assert coverage.max() <= 1, f"visible masks overlap in image {image_id}"
    assert 2 <= np.mean(counts) <= 10


def test_object_sizes_span_small_to_large(tiny_train):
    dataset, _ = tiny_train
    longest_sides = np.array([max(a["bbox"][2:]) for a in dataset["annotations"]])
    assert (longest_sides <= 16).sum() >= 5
    assert (longest_sides >= 150).sum() >= 2


def test_same_class_instances_touch_or_overlap(tiny_train):
    dataset, _ = tiny_train
    kernel = np.ones((3, 3), np.uint8)
    images_with_touching = 0
    for items in _masks_by_image(dataset).values():
        touching = False
        for position, (annotation, mask) in enumerate(items):
            grown = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
            for other_annotation, other_mask in items[position + 1 :]:
                same_class = other_annotation["category_id"] == annotation["category_id"]
                touching |= same_class and bool((grown & other_mask).any())
        images_with_touching += touching
    assert images_with_touching >= 3


def _ensure_in_child(root, barrier, results):
    barrier.wait()  # both processes reach ensure_split together
    results.put(shapes.ensure_split("tiny_val", root=root))


def test_ensure_split_is_concurrency_safe_and_idempotent(tmp_path):
    # fork: the children share this process's standalone copy of the module.
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_ensure_in_child, args=(str(tmp_path), barrier, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    returned = {results.get(timeout=5) for _ in processes}
    assert len(returned) == 1
    json_path, image_root = returned.pop()

    dataset = _load_json(json_path)
    assert len(dataset["images"]) == shapes.SPLITS["tiny_val"][0]
    assert sorted(os.listdir(image_root)) == sorted(i["file_name"] for i in dataset["images"])
    version_dir = tmp_path / shapes.GENERATOR_VERSION
    assert json_path == str(version_dir / "tiny_val" / "annotations.json")
    assert not [name for name in os.listdir(version_dir) if ".tmp-" in name]

    modified = os.stat(json_path).st_mtime_ns
    assert shapes.ensure_split("tiny_val", root=str(tmp_path)) == (json_path, image_root)
    assert os.stat(json_path).st_mtime_ns == modified


def test_vis_cli_writes_side_by_side_pngs(tmp_path):
    out_dir = tmp_path / "vis"
    # The documented `python -m` form imports the masklab_d2.data package, which needs
    # detectron2; without it, run the same CLI from the file.
    entry = ["-m", "masklab_d2.data.shapes"] if HAS_DETECTRON2 else [str(SHAPES_PATH)]
    arguments = [
        "--split",
        "tiny_val",
        "--vis",
        "3",
        "--out",
        str(out_dir),
        "--root",
        str(tmp_path),
    ]
    subprocess.run([sys.executable, *entry, *arguments], cwd=REPO_ROOT, check=True, timeout=120)
    assert sorted(os.listdir(out_dir)) == [f"shapes_tiny_val_{k}.png" for k in range(3)]
    dataset = _load_json(tmp_path / shapes.GENERATOR_VERSION / "tiny_val" / "annotations.json")
    for position, image in enumerate(dataset["images"][:3]):
        panel = cv2.imread(str(out_dir / f"shapes_tiny_val_{position}.png"))
        assert panel.shape == (256, 2 * 256, 3)  # raw image | annotations drawn over it
        assert panel.std() > 10  # not blank
        annotated = any(a["image_id"] == image["id"] for a in dataset["annotations"])
        assert annotated == (not np.array_equal(panel[:, :256], panel[:, 256:]))
