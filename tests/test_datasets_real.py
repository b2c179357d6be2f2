"""Readers of the real benchmark layouts, on tiny fixtures written in the official folder and
archive layouts: COCO panoptic/instance, ADE20K semantic/panoptic, Cityscapes semantic."""

import importlib.util
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from eomt.data import DATASET_LAYOUTS, TrainTransforms, collate, files, resolve_path
from eomt.data.ade20k_panoptic import convert_ade20k_panoptic, panoptic_segments
from eomt.data.categories import ADE20K_150_NAMES, ADE20K_INSTANCE_TO_150
from eomt.data.coco_panoptic import COCOPanopticDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
H, W = 6, 8


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpg(seed: int, height: int = H, width: int = W) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _write_zip(path: Path, files: dict[str, bytes], stored: tuple[str, ...] = ()) -> None:
    """A zip of `files`; members named in `stored` are kept uncompressed (zips inside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            compression = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            archive.writestr(name, data, compress_type=compression)


def _write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _ids_to_rgb(segment_ids: np.ndarray) -> np.ndarray:
    return np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536], -1)


# COCO: image 139 has a person (segment 1000, thing), a crowd of cars (2000) and tree-merged
# stuff (70000, uses the B channel) with a void corner; image 285 is all tree-merged.
PERSON = np.zeros((H, W), bool)
PERSON[0:3, 0:4] = True
CARS = np.zeros((H, W), bool)
CARS[3:6, 0:2] = True
VOID = np.zeros((H, W), bool)
VOID[3:6, 6:8] = True
TREE = ~(PERSON | CARS | VOID)
COCO_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 184, "name": "tree-merged", "isthing": 0, "color": [107, 142, 35]},
]


def _coco_files() -> dict[str, bytes]:
    """The val2017 files of the COCO fixture, by their path in the extracted layout."""
    segments_139 = np.zeros((H, W), np.int64)
    segments_139[PERSON], segments_139[CARS], segments_139[TREE] = 1000, 2000, 70000
    panoptic = {
        "images": [
            {"id": 139, "file_name": "000000000139.jpg", "height": H, "width": W},
            {"id": 285, "file_name": "000000000285.jpg", "height": H, "width": W},
        ],
        "annotations": [
            {
                "image_id": 139,
                "file_name": "000000000139.png",
                "segments_info": [
                    {"id": 1000, "category_id": 1, "iscrowd": 0},
                    {"id": 2000, "category_id": 3, "iscrowd": 1},
                    {"id": 70000, "category_id": 184, "iscrowd": 0},
                ],
            },
            {
                "image_id": 285,
                "file_name": "000000000285.png",
                "segments_info": [{"id": 5, "category_id": 184, "iscrowd": 0}],
            },
        ],
        "categories": COCO_CATEGORIES,
    }
    instances = {
        "images": panoptic["images"],
        "annotations": [
            {
                "id": 1,
                "image_id": 139,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[0, 0, 4, 0, 4, 3, 0, 3]],
            },
            {  # uncompressed RLE, column-major: 3 off, 3 on in each of columns 0 and 1
                "id": 2,
                "image_id": 139,
                "category_id": 3,
                "iscrowd": 1,
                "segmentation": {"counts": [3, 3, 3, 3, 36], "size": [H, W]},
            },
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    return {
        "val2017/000000000139.jpg": _jpg(1),
        "val2017/000000000285.jpg": _jpg(2),
        "annotations/panoptic_val2017.json": json.dumps(panoptic).encode(),
        "annotations/panoptic_val2017/000000000139.png": _png(_ids_to_rgb(segments_139)),
        "annotations/panoptic_val2017/000000000285.png": _png(_ids_to_rgb(np.full((H, W), 5))),
        "annotations/instances_val2017.json": json.dumps(instances).encode(),
    }


def _write_coco_zips(root: Path, files: dict[str, bytes]) -> None:
    """The official archives: val2017.zip, annotations_trainval2017.zip and
    panoptic_annotations_trainval2017.zip, whose PNGs are in a zip inside it."""

    def select(prefix: str, rename=lambda name: name) -> dict[str, bytes]:
        return {rename(k): v for k, v in files.items() if k.startswith(prefix)}

    _write_zip(root / "val2017.zip", select("val2017/"))
    _write_zip(root / "annotations_trainval2017.zip", select("annotations/instances_"))
    inner = _zip_bytes(select("annotations/panoptic_val2017/", lambda k: k[len("annotations/") :]))
    _write_zip(
        root / "panoptic_annotations_trainval2017.zip",
        {
            "annotations/panoptic_val2017.json": files["annotations/panoptic_val2017.json"],
            "annotations/panoptic_val2017.zip": inner,
        },
        stored=("annotations/panoptic_val2017.zip",),
    )


@pytest.fixture(scope="module")
def coco_roots(tmp_path_factory) -> tuple[Path, Path]:
    """(extracted folders, official zips) of the same COCO val2017 fixture."""
    files = _coco_files()
    folders, zips = tmp_path_factory.mktemp("coco_folders"), tmp_path_factory.mktemp("coco_zips")
    _write_files(folders, files)
    _write_coco_zips(zips, files)
    return folders, zips


def _assert_same_items(first, second) -> None:
    assert len(first) == len(second)
    for (image_a, target_a), (image_b, target_b) in zip(first, second):
        assert torch.equal(image_a, image_b)
        assert target_a.keys() == target_b.keys()
        for key in target_a:
            if torch.is_tensor(target_a[key]):
                assert torch.equal(target_a[key], target_b[key]), key
            else:
                assert target_a[key] == target_b[key], key


def test_coco_panoptic_reader_outputs(coco_roots):
    folders, zips = coco_roots
    dataset = DATASET_LAYOUTS["coco_panoptic"](folders, "val", None)
    assert dataset.categories == COCO_CATEGORIES  # contiguous labels 0, 1, 2 for ids 1, 3, 184
    image, target = dataset[0]
    assert image.shape == (3, H, W) and target["image_id"] == 139
    assert target["file_name"] == "000000000139.jpg"
    assert target["labels"].tolist() == [0, 1, 2]
    assert target["is_crowd"].tolist() == [False, True, False]
    expected = torch.from_numpy(np.stack([PERSON, CARS, TREE]))
    assert torch.equal(target["masks"], expected)
    assert not target["masks"].any(dim=0)[torch.from_numpy(VOID)].any()

    zipped = DATASET_LAYOUTS["coco_panoptic"](zips, "val", None)
    assert "panoptic_val2017.zip/panoptic_val2017" in str(zipped.png_dir)
    _assert_same_items(dataset, zipped)


def test_coco_instance_reader_outputs(coco_roots):
    folders, zips = coco_roots
    dataset = DATASET_LAYOUTS["coco_instance"](folders, "val", None)
    assert [(c["id"], c["name"], c["isthing"]) for c in dataset.categories] == [
        (1, "person", 1),
        (3, "car", 1),
    ]
    _, target = dataset[0]
    assert target["labels"].tolist() == [0, 1]
    assert target["is_crowd"].tolist() == [False, True]
    assert torch.equal(target["masks"], torch.from_numpy(np.stack([PERSON, CARS])))
    _, empty = dataset[1]
    assert empty["masks"].shape == (0, H, W) and empty["image_id"] == 285
    _assert_same_items(dataset, DATASET_LAYOUTS["coco_instance"](zips, "val", None))


def test_detectron2_png_folder_and_extracted_inner_zip(coco_roots, tmp_path):
    folders, zips = coco_roots
    reference = DATASET_LAYOUTS["coco_panoptic"](folders, "val", None)
    # PNGs at coco/panoptic_val2017/ (detectron2's layout), JSON inside the official zip.
    (tmp_path / "a").mkdir()
    (tmp_path / "a/val2017").symlink_to(folders / "val2017")
    (tmp_path / "a/panoptic_val2017").symlink_to(folders / "annotations/panoptic_val2017")
    (tmp_path / "a/panoptic_annotations_trainval2017.zip").symlink_to(
        zips / "panoptic_annotations_trainval2017.zip"
    )
    _assert_same_items(reference, DATASET_LAYOUTS["coco_panoptic"](tmp_path / "a", "val", None))
    # The inner PNG zip extracted from the outer one, next to the JSON.
    with zipfile.ZipFile(zips / "panoptic_annotations_trainval2017.zip") as outer:
        outer.extractall(tmp_path / "b")
    (tmp_path / "b/val2017.zip").symlink_to(zips / "val2017.zip")
    dataset = DATASET_LAYOUTS["coco_panoptic"](tmp_path / "b", "val", None)
    assert str(dataset.png_dir).endswith("b/annotations/panoptic_val2017.zip/panoptic_val2017")
    _assert_same_items(reference, dataset)


def test_compressed_inner_zip_is_refused_with_advice(coco_roots, tmp_path):
    _, zips = coco_roots
    with zipfile.ZipFile(zips / "panoptic_annotations_trainval2017.zip") as outer:
        members = {name: outer.read(name) for name in outer.namelist()}
    _write_zip(tmp_path / "panoptic_annotations_trainval2017.zip", members)  # all deflated
    with pytest.raises(ValueError, match=r"panoptic_val2017\.zip.*compressed.*extract"):
        resolve_path(
            tmp_path / "panoptic_annotations_trainval2017.zip/annotations/panoptic_val2017.zip/x"
        ).exists()


def test_members_escaping_the_archive_are_refused(tmp_path):
    _write_zip(tmp_path / "evil.zip", {"images/a.png": b"a", "../evil.png": b"x"})
    with pytest.raises(ValueError, match=r"evil\.zip.*'\.\./evil\.png' escapes"):
        resolve_path(tmp_path / "evil.zip/images/a.png").read_bytes()
    _write_tar(tmp_path / "evil.tar", {"/etc/evil.png": b"x"})
    with pytest.raises(ValueError, match=r"evil\.tar.*'/etc/evil\.png' escapes"):
        resolve_path(tmp_path / "evil.tar/etc/evil.png").is_file()
    _write_zip(tmp_path / "good.zip", {"images/a.png": b"a"})
    folder = resolve_path(tmp_path / "good.zip/images")
    assert (folder / "a.png").read_bytes() == b"a"
    for name in ("../../outside.png", "/abs.png", "x/../../y.png"):
        with pytest.raises(ValueError, match="escapes its folder"):
            folder / name
    with pytest.raises(ValueError, match="escapes its folder"):
        resolve_path(tmp_path) / "../outside.png"


def test_missing_member_or_broken_archive_are_named(coco_roots, tmp_path):
    _, zips = coco_roots
    images = resolve_path(zips / "val2017.zip/val2017")
    assert images.is_dir() and images.files(".jpg") == ["000000000139.jpg", "000000000285.jpg"]
    with pytest.raises(FileNotFoundError, match=r"val2017\.zip/val2017/nothing\.jpg"):
        (images / "nothing.jpg").read_bytes()
    (tmp_path / "train2017.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"train2017\.zip: not a readable zip archive"):
        resolve_path(tmp_path / "train2017.zip/train2017").exists()


def test_zip_dataset_pickles_and_reopens_in_workers(coco_roots):
    folders, zips = coco_roots
    reference = DATASET_LAYOUTS["coco_panoptic"](folders, "val", None)
    dataset = DATASET_LAYOUTS["coco_panoptic"](zips, "val", None)
    dataset[0]  # opens the archives in this process before workers fork
    assert b"ZipFile" not in pickle.dumps(dataset)
    _assert_same_items(reference, pickle.loads(pickle.dumps(dataset)))
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=collate)
    from_workers = [(images[0], targets[0]) for images, targets in loader]
    _assert_same_items(reference, from_workers)


def test_archives_are_reopened_in_a_new_process(coco_roots, monkeypatch):
    _, zips = coco_roots
    path = resolve_path(zips / "val2017.zip/val2017/000000000139.jpg")
    data = path.read_bytes()
    opened_here = files._archive(path.disk, path.nested)
    monkeypatch.setattr(files.os, "getpid", lambda: -1)  # as seen from a forked worker
    assert path.read_bytes() == data
    assert files._archive(path.disk, path.nested) is not opened_here


def test_string_image_ids_are_refused(coco_roots, tmp_path):
    folders, _ = coco_roots
    content = json.loads((folders / "annotations/panoptic_val2017.json").read_text())
    for entry in content["images"] + content["annotations"]:
        key = "id" if "height" in entry else "image_id"
        entry[key] = f"ADE_val_{entry[key]}"
    (tmp_path / "strings.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"strings\.json: image id 'ADE_val_139' is not an int"):
        COCOPanopticDataset(
            folders / "val2017", tmp_path / "strings.json", folders / "annotations/panoptic_val2017"
        )


# Cityscapes: label ids 7 road, 26 car, 33 bicycle (train ids 0, 13, 18); 0 unlabelled and
# 9 parking are ignored. The image paints each label id in its own colour.
CITYSCAPES_IDS = np.array(
    [
        [7, 7, 7, 7, 26, 26, 0, 0],
        [7, 7, 7, 7, 26, 26, 0, 0],
        [7, 7, 9, 9, 26, 26, 33, 33],
        [7, 7, 9, 9, 26, 26, 33, 33],
        [7, 7, 7, 7, 7, 7, 33, 33],
        [7, 7, 7, 7, 7, 7, 7, 7],
    ]
)
COLOR_OF_ID = {7: (255, 0, 0), 26: (0, 255, 0), 33: (0, 0, 255), 0: (255, 255, 0), 9: (0, 255, 255)}
TRAIN_ID = {7: 0, 26: 13, 33: 18, 0: 255, 9: 255}


def _cityscapes_files() -> dict[str, bytes]:
    image = np.zeros((H, W, 3), np.uint8)
    for label_id, color in COLOR_OF_ID.items():
        image[CITYSCAPES_IDS == label_id] = color
    files = {}
    for split, city, flip in (("train", "aachen", False), ("val", "frankfurt", True)):
        stem = f"{city}/{city}_000000_000019"
        ids = CITYSCAPES_IDS[:, ::-1] if flip else CITYSCAPES_IDS
        files[f"leftImg8bit/{split}/{stem}_leftImg8bit.png"] = _png(
            image[:, ::-1] if flip else image
        )
        files[f"gtFine/{split}/{stem}_gtFine_labelIds.png"] = _png(ids)
        # Other gtFine files that the reader must pass over.
        files[f"gtFine/{split}/{stem}_gtFine_instanceIds.png"] = _png(ids * 0)
        files[f"gtFine/{split}/{stem}_gtFine_polygons.json"] = b"{}"
    return files


@pytest.fixture(scope="module")
def cityscapes_roots(tmp_path_factory) -> tuple[Path, Path]:
    files = _cityscapes_files()
    folders = tmp_path_factory.mktemp("cityscapes_folders")
    zips = tmp_path_factory.mktemp("cityscapes_zips")
    _write_files(folders, files)
    for prefix in ("leftImg8bit", "gtFine"):
        members = {k: v for k, v in files.items() if k.startswith(f"{prefix}/")}
        members.update({"README": b"readme", "license.txt": b"license"})  # as the official zips
        _write_zip(zips / f"{prefix}_trainvaltest.zip", members)
    return folders, zips


def test_cityscapes_label_ids_map_to_train_ids(cityscapes_roots):
    folders, zips = cityscapes_roots
    dataset = DATASET_LAYOUTS["cityscapes_semantic"](folders, "train", None)
    assert len(dataset.categories) == 19
    assert [dataset.categories[i]["name"] for i in (0, 13, 18)] == ["road", "car", "bicycle"]
    assert [dataset.categories[i]["id"] for i in (0, 13, 18)] == [7, 26, 33]
    assert dataset.categories[0]["color"] == [128, 64, 128]
    expected = np.vectorize(TRAIN_ID.get)(CITYSCAPES_IDS)
    np.testing.assert_array_equal(dataset.read_label_map(0), expected)
    _, target = dataset[0]
    assert target["file_name"] == "aachen_000000_000019_leftImg8bit.png"
    assert target["labels"].tolist() == [0, 13, 18]
    assert torch.equal(target["masks"][1], torch.from_numpy(CITYSCAPES_IDS == 26))
    for split in ("train", "val"):
        _assert_same_items(
            DATASET_LAYOUTS["cityscapes_semantic"](folders, split, None),
            DATASET_LAYOUTS["cityscapes_semantic"](zips, split, None),
        )


def test_cityscapes_label_ids_map_to_the_8_categories(cityscapes_roots):
    folders, _ = cityscapes_roots
    dataset = DATASET_LAYOUTS["cityscapes_categories"](folders, "train", None)
    names = ["void", "flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    assert [c["name"] for c in dataset.categories] == names
    # road (7) is flat, car (26) and bicycle (33) vehicles, unlabeled (0) void, parking (9)
    # flat: no label id is ignored here, unlike the 19 train ids.
    category = {7: 1, 26: 7, 33: 7, 0: 0, 9: 1}
    expected = np.vectorize(category.get)(CITYSCAPES_IDS)
    np.testing.assert_array_equal(dataset.read_label_map(0), expected)
    _, target = dataset[0]
    assert target["labels"].tolist() == [0, 1, 7]


def test_augmentation_keeps_masks_on_their_pixels(cityscapes_roots):
    _, zips = cityscapes_roots
    dataset = DATASET_LAYOUTS["cityscapes_semantic"](zips, "train", None)
    image, target = dataset[0]
    color_of_label = {TRAIN_ID[i]: torch.tensor(c) / 255 for i, c in COLOR_OF_ID.items()}

    def crops(picture):  # all 3x4 crops, without resizing
        return [picture[:, top : top + 3, left : left + 4] for top in range(4) for left in range(5)]

    # Scale 2 fits the 6x8 image to a 3x4 crop exactly, so outputs are crops of the image.
    flip_crop = TrainTransforms((3, 4), scale_range=(2.0, 2.0), color_jitter=False)
    flipped = unflipped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_target = flip_crop(image, target)
        for mask, label in zip(out_target["masks"], out_target["labels"].tolist()):
            pixels = out_image[:, mask].T
            assert len(pixels) and torch.equal(pixels, color_of_label[label].expand_as(pixels))
        # Pixels under no mask are the ignored ones (yellow: id 0, cyan: id 9).
        uncovered = out_image[:, ~out_target["masks"].any(dim=0)].T
        assert all(tuple(p) in {(1, 1, 0), (0, 1, 1)} for p in uncovered.tolist())
        plain = any(torch.equal(out_image, crop) for crop in crops(image))
        mirrored = any(torch.equal(out_image, crop) for crop in crops(image.flip(-1)))
        assert plain or mirrored
        flipped += int(mirrored and not plain)
        unflipped += int(plain and not mirrored)
    assert flipped > 0 and unflipped > 0

    # A crop taller than the image: the bottom rows are padding, in no mask and black.
    pad = TrainTransforms((9, 8), scale_range=(1.0, 1.0), color_jitter=False)
    labelled = torch.from_numpy(np.isin(CITYSCAPES_IDS, [7, 26, 33]))
    for seed in range(4):
        torch.manual_seed(seed)
        out_image, out_target = pad(image, target)
        coverage = out_target["masks"].any(dim=0)
        assert out_image.shape == (3, 9, 8)
        assert not coverage[H:].any() and (out_image[:, H:] == 0).all()
        assert torch.equal(coverage[:H], labelled) or torch.equal(coverage[:H], labelled.flip(-1))


# ADE20K: one image per split. Semantic classes: wall 1 (stuff), bed 8 (thing), floor 4
# (stuff), sky 3 (stuff), flag 150 (thing). Instances: two beds (instance class 1), a flag
# (100) and a person (4 -> class 13) that covers all of the sky.
ADE_SEMANTIC = np.array(
    [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [8, 8, 8, 8, 4, 4, 4, 4],
        [8, 8, 8, 8, 4, 4, 4, 4],
        [3, 3, 3, 3, 150, 150, 150, 150],
        [3, 3, 3, 3, 150, 150, 150, 150],
    ]
)
ADE_INSTANCES = np.zeros((H, W, 3), np.int64)  # R: instance class, G: instance id
ADE_INSTANCES[2:4, 0:2] = (1, 1, 0)
ADE_INSTANCES[4:6, 4:8] = (100, 2, 0)
ADE_INSTANCES[4:6, 0:4] = (4, 3, 0)
ADE_INSTANCES[2:4, 6:8] = (1, 4, 0)
# id, category, area, bbox; sky (segment 2) is gone, bed pixels of no instance are void.
ADE_SEGMENTS = [
    (1, 1, 16, [0, 0, 8, 2]),
    (3, 4, 4, [4, 2, 2, 2]),
    (4, 8, 4, [0, 2, 2, 2]),
    (5, 150, 8, [4, 4, 4, 2]),
    (6, 13, 8, [0, 4, 4, 2]),
    (7, 8, 4, [6, 2, 2, 2]),
]


def _ade20k_files() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(ADEChallengeData2016/... files, annotations_instance/... files)."""
    challenge = {
        "ADEChallengeData2016/objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n",
        "ADEChallengeData2016/sceneCategories.txt": b"ADE_train_00000001 bedroom\n",
    }
    instances = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        stem = f"ADE_{split}_00000001"
        challenge[f"ADEChallengeData2016/images/{folder}/{stem}.jpg"] = _jpg(3)
        challenge[f"ADEChallengeData2016/annotations/{folder}/{stem}.png"] = _png(ADE_SEMANTIC)
        instances[f"annotations_instance/{folder}/{stem}.png"] = _png(ADE_INSTANCES)
    return challenge, instances


@pytest.fixture(scope="module")
def ade20k_roots(tmp_path_factory) -> tuple[Path, Path]:
    """(extracted, with annotations_instance inside ADEChallengeData2016 as Mask2Former has it;
    official archives ADEChallengeData2016.zip and annotations_instance.tar)."""
    challenge, instances = _ade20k_files()
    folders, archives = tmp_path_factory.mktemp("ade_folders"), tmp_path_factory.mktemp("ade_zip")
    _write_files(folders, challenge)
    _write_files(folders / "ADEChallengeData2016", instances)
    _write_zip(archives / "ADEChallengeData2016.zip", challenge)
    _write_tar(archives / "annotations_instance.tar", instances)
    return folders, archives


def test_ade20k_semantic_ignores_zero_and_names_150_classes(ade20k_roots):
    folders, archives = ade20k_roots
    dataset = DATASET_LAYOUTS["ade20k_semantic"](folders, "val", None)
    assert len(dataset.categories) == 150
    assert [c["id"] for c in dataset.categories] == list(range(1, 151))
    assert dataset.categories[0]["name"] == "wall" and dataset.categories[149]["name"] == "flag"
    assert not any(c["isthing"] for c in dataset.categories)
    np.testing.assert_array_equal(dataset.read_label_map(0), ADE_SEMANTIC - 1)
    _, target = dataset[0]
    assert target["labels"].tolist() == [0, 2, 3, 7, 149]
    assert target["file_name"] == "ADE_val_00000001.jpg"
    for split in ("train", "val"):
        _assert_same_items(
            DATASET_LAYOUTS["ade20k_semantic"](folders, split, None),
            DATASET_LAYOUTS["ade20k_semantic"](archives, split, None),
        )

    labels = ADE_SEMANTIC.copy()
    labels[0, 0] = 0
    (folders / "zero").mkdir()
    (folders / "zero/ADE_val_00000001.png").write_bytes(_png(labels))
    zero = DATASET_LAYOUTS["ade20k_semantic"].build(
        {"images": dataset.image_dir, "masks": resolve_path(folders / "zero")}, None
    )
    assert zero.read_label_map(0)[0, 0] == 255 and zero.read_label_map(0)[0, 1] == 0


def test_ade20k_instance_table_matches_class_names():
    names = [ADE20K_150_NAMES[i - 1] for i in ADE20K_INSTANCE_TO_150]
    assert len(set(ADE20K_INSTANCE_TO_150)) == 100 and max(ADE20K_INSTANCE_TO_150) == 150
    # Instance classes 1, 2, 4, 59, 92, 100 of instanceInfo100: bed, windowpane, person,
    # airplane, ashcan, flag.
    assert [names[i - 1] for i in (1, 2, 4, 59, 92, 100)] == [
        "bed",
        "window",
        "person",
        "plane",
        "trash can",
        "flag",
    ]


def test_ade20k_panoptic_conversion(ade20k_roots, tmp_path):
    folders, archives = ade20k_roots
    convert_ade20k_panoptic(folders, tmp_path / "from_folders")
    convert_ade20k_panoptic(archives, tmp_path / "from_archives", workers=2)
    for split in ("train", "val"):
        name = f"ade20k_panoptic_{split}"
        content = json.loads((tmp_path / f"from_folders/{name}.json").read_text())
        assert content == json.loads((tmp_path / f"from_archives/{name}.json").read_text())
        png = f"{name}/ADE_{split}_00000001.png"
        assert (tmp_path / "from_folders" / png).read_bytes() == (
            tmp_path / "from_archives" / png
        ).read_bytes()

    content = json.loads((tmp_path / "from_folders/ade20k_panoptic_val.json").read_text())
    assert content["images"] == [
        {"id": 1, "file_name": "ADE_val_00000001.jpg", "width": W, "height": H}
    ]
    assert len(content["categories"]) == 150
    assert sum(c["isthing"] for c in content["categories"]) == 100
    (annotation,) = content["annotations"]
    assert annotation["image_id"] == 1 and annotation["file_name"] == "ADE_val_00000001.png"
    assert [
        (s["id"], s["category_id"], s["area"], s["bbox"]) for s in annotation["segments_info"]
    ] == ADE_SEGMENTS

    # The layout reads the conversion beside the images in ADEChallengeData2016.zip.
    for item in ("ade20k_panoptic_val.json", "ade20k_panoptic_val"):
        (archives / item).symlink_to(tmp_path / "from_archives" / item)
    _, target = DATASET_LAYOUTS["ade20k_panoptic"](archives, "val", None)[0]
    assert target["labels"].tolist() == [0, 3, 7, 149, 12, 7]
    assert not target["is_crowd"].any()
    coverage = target["masks"].sum(dim=0)
    assert coverage.max() == 1 and coverage.sum() == H * W - 4
    assert not coverage[2:4, 2:4].any()  # bed pixels without an instance
    assert torch.equal(target["masks"][4], torch.from_numpy(ADE_INSTANCES[..., 1] == 3))


def test_ade20k_conversion_errors_name_the_image(ade20k_roots, tmp_path):
    _, archives = ade20k_roots
    mixed = ADE_INSTANCES.copy()
    mixed[0, 0] = (5, 1, 0)  # instance 1 is both class 1 and class 5
    with pytest.raises(ValueError, match=r"img\.jpg: instance 1 has instance classes \[1, 5\]"):
        panoptic_segments(ADE_SEMANTIC, mixed, "img.jpg")
    (tmp_path / "ADEChallengeData2016.zip").symlink_to(archives / "ADEChallengeData2016.zip")
    with pytest.raises(FileNotFoundError, match=r"instance annotations of split 'train'.*\.tar"):
        convert_ade20k_panoptic(tmp_path, tmp_path / "out")


# The check command


def _check_cli():
    spec = importlib.util.spec_from_file_location(
        "check_dataset", REPO_ROOT / "datasets/check_dataset.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return lambda *argv: cli.main(cli.parse_args(list(argv)))


def test_check_command_reports_found_and_missing(coco_roots, ade20k_roots, tmp_path, capsys):
    folders, zips = coco_roots
    check = _check_cli()
    assert check("coco_panoptic", str(zips), "--splits", "val") == 0
    out = capsys.readouterr().out
    assert "panoptic_annotations_trainval2017.zip/annotations/panoptic_val2017.zip" in out
    assert "2 images, 3 classes (the full split has 5000 images)" in out
    assert "sample 1: 000000000285.jpg 6x8, 1 masks" in out and out.endswith("OK\n")

    # No panoptic PNGs anywhere: reported with the places looked at, exit status 1.
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco/val2017").symlink_to(folders / "val2017")
    (tmp_path / "coco/annotations").mkdir()
    (tmp_path / "coco/annotations/panoptic_val2017.json").symlink_to(
        folders / "annotations/panoptic_val2017.json"
    )
    assert check("coco_panoptic", str(tmp_path / "coco"), "--splits", "val") == 1
    out = capsys.readouterr().out
    assert "MISSING masks: none of" in out and "coco/panoptic_val2017," in out

    # A PNG folder that lacks one of the files the JSON lists.
    (tmp_path / "coco/annotations/panoptic_val2017").mkdir()
    (tmp_path / "coco/annotations/panoptic_val2017/000000000139.png").symlink_to(
        folders / "annotations/panoptic_val2017/000000000139.png"
    )
    assert check("coco_panoptic", str(tmp_path / "coco"), "--splits", "val") == 1
    out = capsys.readouterr().out
    assert "MISSING 1 listed files, e.g. " in out and "000000000285.png" in out

    # ADE20K panoptic before the conversion: the hint says how to make it.
    assert check("ade20k_panoptic", str(ade20k_roots[0])) == 1
    assert "prepare_ade20k_panoptic.py" in capsys.readouterr().out


def test_synthetic_layouts(synthetic_root):
    panoptic = DATASET_LAYOUTS["synthetic_panoptic"](synthetic_root, "val", None)
    instance = DATASET_LAYOUTS["synthetic_instance"](synthetic_root, "val", None)
    semantic = DATASET_LAYOUTS["synthetic_semantic"](synthetic_root, "val", None)
    assert len(panoptic) == len(instance) == len(semantic) == 4
    assert [c["name"] for c in semantic.categories] == [c["name"] for c in panoptic.categories]
    assert not any(c["isthing"] for c in semantic.categories)
    assert all(c["isthing"] for c in instance.categories)
    with pytest.raises(ValueError, match="split 'test' is not one of"):
        DATASET_LAYOUTS["coco_panoptic"](synthetic_root, "test", None)
