"""Bad input: each case gets a message naming the file and the problem, and the
dataset.bad_samples policy (stop, or skip and count) decides what happens next.

Every reader is exercised on tiny copies of the official layouts (the fixtures of
test_datasets_real.py) and of the synthetic dataset, broken one way per test.
"""

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eomt import load_checkpoint
from eomt.config import ConfigError, get_cfg
from eomt.data import (
    DATASET_LAYOUTS,
    BadSampleError,
    BadSampleWarning,
    TrainTransforms,
    generate_synthetic_dataset,
    load_image,
)
from eomt.data.ade20k_panoptic import convert_ade20k_panoptic
from eomt.data.bad_samples import MissingSampleFileError, SkipBadSamples
from eomt.data.build import build_dataset, build_test_loader, build_train_loader
from eomt.modeling.criterion import MaskClassificationLoss
from tests.test_data import _write_modified_json
from tests.test_datasets_real import (
    _ade20k_files,
    _cityscapes_files,
    _coco_files,
    _ids_to_rgb,
    _png,
    _write_files,
)
from tests.test_weights import DINOV3, tiny_model

ADE_IMAGE = "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"
CITY_STEM = "frankfurt/frankfurt_000000_000019"


class Case:
    """Where a layout's val sample 0 keeps its image and annotation under the root."""

    def __init__(self, source: str, image: str, annotation: str, json: str = ""):
        self.source, self.image, self.annotation, self.json = source, image, annotation, json
        self.is_instance = annotation.endswith(".json")  # the JSON gives the geometry


CASES = {
    "coco_panoptic": Case(
        "coco",
        "val2017/000000000139.jpg",
        "annotations/panoptic_val2017/000000000139.png",
        "annotations/panoptic_val2017.json",
    ),
    "coco_instance": Case(
        "coco",
        "val2017/000000000139.jpg",
        "annotations/instances_val2017.json",
        "annotations/instances_val2017.json",
    ),
    "ade20k_semantic": Case(
        "ade20k", ADE_IMAGE, "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    ),
    "ade20k_panoptic": Case(
        "ade20k",
        ADE_IMAGE,
        "ade20k_panoptic_val/ADE_val_00000001.png",
        "ade20k_panoptic_val.json",
    ),
    "cityscapes_semantic": Case(
        "cityscapes",
        f"leftImg8bit/val/{CITY_STEM}_leftImg8bit.png",
        f"gtFine/val/{CITY_STEM}_gtFine_labelIds.png",
    ),
    "synthetic_panoptic": Case(
        "synthetic",
        "images/val/000001.jpg",
        "annotations/panoptic_val/000001.png",
        "annotations/panoptic_val.json",
    ),
    "synthetic_instance": Case(
        "synthetic",
        "images/val/000001.jpg",
        "annotations/instances_val.json",
        "annotations/instances_val.json",
    ),
    "synthetic_semantic": Case(
        "synthetic", "images/val/000001.jpg", "annotations/semantic_val/000001.png"
    ),
}
PANOPTIC = [name for name in CASES if name.endswith("panoptic")]
INSTANCE = [name for name in CASES if name.endswith("instance")]
SEMANTIC = [name for name in CASES if name.endswith("semantic")]
WITH_JSON = PANOPTIC + INSTANCE  # images listed by a JSON
WITH_PNG = PANOPTIC + SEMANTIC  # an annotation PNG per image


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One root per source, in the official layouts; tests break copies of them."""
    base = tmp_path_factory.mktemp("bad_input_sources")
    _write_files(base / "coco", _coco_files())
    challenge, instances = _ade20k_files()
    _write_files(base / "ade20k", challenge)
    _write_files(base / "ade20k/ADEChallengeData2016", instances)
    convert_ade20k_panoptic(base / "ade20k", splits=("val",))
    _write_files(base / "cityscapes", _cityscapes_files())
    generate_synthetic_dataset(base / "synthetic", num_train=2, num_val=2, seed=1)
    return base


@pytest.fixture
def copy_of(sources, tmp_path):
    """copy_of(layout) -> (root, case): a fresh copy of the layout's source to break."""

    def make(name: str) -> tuple[Path, Case]:
        case = CASES[name]
        root = tmp_path / case.source
        if not root.exists():
            shutil.copytree(sources / case.source, root)
        return root, case

    return make


def _build(name: str, root: Path, policy: str = "stop"):
    return DATASET_LAYOUTS[name](root, "val", None, policy)


def _raises(call, *parts: str, kind=BadSampleError) -> BaseException:
    """The error `call` raises, an instance of `kind` whose message holds every part."""
    with pytest.raises(kind) as info:
        call()
    for part in parts:
        assert part in str(info.value), str(info.value)
    return info.value


def _size(root: Path, case: Case) -> tuple[int, int]:
    """(height, width) of sample 0's annotation: its PNG, or the instance JSON's entry."""
    if case.is_instance:
        image = json.loads((root / case.json).read_text())["images"][0]
        return image["height"], image["width"]
    with Image.open(root / case.annotation) as png:
        return png.height, png.width


def _png_bytes(pixels: np.ndarray, exif_orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    options = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        options["exif"] = exif
    Image.fromarray(pixels).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _pattern(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def _as_float(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


# A truncated or corrupt image or annotation PNG


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("name", list(CASES))
def test_truncated_or_corrupt_image(copy_of, name, damage):
    root, case = copy_of(name)
    data = (root / case.image).read_bytes()
    (root / case.image).write_bytes(data[: len(data) // 2] if damage == "truncated" else b"junk")
    _raises(lambda: _build(name, root)[0], case.image, "corrupt, truncated or not an image")


@pytest.mark.parametrize("name", WITH_PNG)
def test_truncated_annotation_png(copy_of, name):
    root, case = copy_of(name)
    data = (root / case.annotation).read_bytes()
    (root / case.annotation).write_bytes(data[: len(data) // 2])
    _raises(lambda: _build(name, root)[0], case.annotation, "corrupt, truncated")


# A missing image or annotation file


@pytest.mark.parametrize("name", WITH_JSON)
def test_missing_image(copy_of, name):
    root, case = copy_of(name)
    (root / case.image).unlink()
    error = _raises(lambda: _build(name, root)[0], "Image file not found", case.image)
    assert isinstance(error, MissingSampleFileError) and isinstance(error, FileNotFoundError)


@pytest.mark.parametrize("name", PANOPTIC)
def test_missing_panoptic_png(copy_of, name):
    root, case = copy_of(name)
    (root / case.annotation).unlink()
    _raises(lambda: _build(name, root)[0], "Panoptic PNG not found", case.annotation)


@pytest.mark.parametrize("name", SEMANTIC)
def test_missing_label_png_stops_at_build_or_is_skipped(copy_of, name):
    root, case = copy_of(name)
    (root / case.annotation).unlink()
    # The image folder lists the samples: a missing label is known before any is read.
    _raises(lambda: _build(name, root), "Label file not found", case.annotation)
    dataset = _build(name, root, "skip")
    _raises(lambda: dataset[0], "Label file not found", case.annotation)


def test_missing_folder_or_json_always_stops(copy_of):
    root, case = copy_of("coco_panoptic")
    (root / case.json).unlink()
    with pytest.raises(FileNotFoundError, match="annotations of split 'val' not found"):
        _build("coco_panoptic", root, "skip")
    (root / case.json).write_text("{not json")
    with pytest.raises(ValueError, match=r"panoptic_val2017\.json: not valid JSON"):
        _build("coco_panoptic", root, "skip")


# Grayscale, RGBA, palette, 16-bit and EXIF-rotated images


def test_image_modes_load_as_8bit_rgb(tmp_path):
    gray = np.array([[0, 100, 255], [7, 8, 9]], np.uint8)
    expected = torch.from_numpy(np.repeat(gray[..., None], 3, -1)).permute(2, 0, 1) / 255
    images = {
        "gray.png": Image.fromarray(gray),
        "gray_alpha.png": Image.fromarray(np.stack([gray, gray // 2], -1)),
        "palette.png": Image.fromarray(gray).convert("P"),
    }
    for name, picture in images.items():
        picture.save(tmp_path / name)
        torch.testing.assert_close(load_image(tmp_path / name), expected, msg=name)

    rgba = np.dstack([_pattern(2, 3), np.full((2, 3), 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    torch.testing.assert_close(load_image(tmp_path / "rgba.png"), _as_float(rgba[..., :3]))

    # 16 bits are scaled to 8 (65535 -> 255, 32896 -> 128), not clipped at 255.
    wide = np.array([[0, 257, 32896], [65535, 1000, 128]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as check:
        assert check.mode == "I;16"
    scaled = np.rint(wide / 257).astype(np.uint8)
    expected16 = torch.from_numpy(np.repeat(scaled[..., None], 3, -1)).permute(2, 0, 1) / 255
    torch.testing.assert_close(load_image(tmp_path / "gray16.png"), expected16)
    Image.fromarray(wide.astype(np.int32)).save(tmp_path / "gray32.tif")  # mode I
    torch.testing.assert_close(load_image(tmp_path / "gray32.tif"), expected16)

    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "float.tif")
    _raises(lambda: load_image(tmp_path / "float.tif"), "float.tif", "floating-point")


def test_exif_orientation_without_annotation_is_applied(tmp_path):
    pattern = _pattern(2, 3)
    for orientation, stored in ((6, np.rot90(pattern, 1)), (8, np.rot90(pattern, -1))):
        (tmp_path / "turned.png").write_bytes(_png_bytes(np.ascontiguousarray(stored), orientation))
        torch.testing.assert_close(load_image(tmp_path / "turned.png"), _as_float(pattern))


@pytest.mark.parametrize("name", list(CASES))
def test_exif_rotated_and_16bit_images_in_readers(copy_of, name):
    root, case = copy_of(name)
    height, width = _size(root, case)
    assert height != width
    pattern = _pattern(height, width)

    # Stored turned, with the orientation that turns it back to the annotation's geometry.
    (root / case.image).write_bytes(_png_bytes(np.ascontiguousarray(np.rot90(pattern, 1)), 6))
    image, target = _build(name, root)[0]
    torch.testing.assert_close(image, _as_float(pattern))
    assert target["masks"].shape[1:] == (height, width)

    # The orientation would turn it away from the annotation: the stored pixels are used.
    (root / case.image).write_bytes(_png_bytes(pattern, 6))
    torch.testing.assert_close(_build(name, root)[0][0], _as_float(pattern))

    # A 16-bit grayscale image is scaled to 8 bits.
    wide = np.random.default_rng(1).integers(0, 65536, (height, width)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    (root / case.image).write_bytes(buffer.getvalue())
    image = _build(name, root)[0][0]
    torch.testing.assert_close(image[0], torch.from_numpy(np.rint(wide / 257) / 255).float())
    assert torch.equal(image[0], image[2])


@pytest.mark.parametrize("name", list(CASES))
def test_annotation_size_differs_from_image(copy_of, name):
    root, case = copy_of(name)
    height, width = _size(root, case)
    # Neither as stored (h+1 x w) nor oriented (w x h+1) does the image fit the annotation.
    (root / case.image).write_bytes(_png_bytes(_pattern(height + 1, width), 6))
    where = case.json if case.is_instance else case.annotation
    _raises(
        lambda: _build(name, root)[0],
        where,
        f"size {height}x{width} (height x width) differs from its image",
        case.image,
        f"which is {height + 1}x{width} ({width}x{height + 1} with its EXIF orientation)",
    )


# An annotation whose category is unknown


def _first_annotation(content: dict) -> dict:
    image_id = content["images"][0]["id"]
    return next(a for a in content["annotations"] if a["image_id"] == image_id)


@pytest.mark.parametrize("name", WITH_JSON)
def test_unknown_category_stops_at_build_or_skips_the_image(copy_of, name):
    root, case = copy_of(name)
    content = json.loads((root / case.json).read_text())
    annotation = _first_annotation(content)
    if case.is_instance:
        annotation["category_id"] = 999
        what = f"annotation {annotation['id']} of image {annotation['image_id']}"
    else:
        annotation["segments_info"][0]["category_id"] = 999
        what = f"segment {annotation['segments_info'][0]['id']} of image {annotation['image_id']}"
    (root / case.json).write_text(json.dumps(content))
    parts = (case.json, what, "unknown category id 999")
    _raises(lambda: _build(name, root), *parts)
    dataset = _build(name, root, "skip")
    _raises(lambda: dataset[0], *parts)
    for index in range(1, len(dataset)):
        dataset[index]


@pytest.mark.parametrize("name", SEMANTIC)
def test_unknown_label_value_is_a_bad_sample(copy_of, name):
    root, case = copy_of(name)
    with Image.open(root / case.annotation) as png:
        labels = np.asarray(png).copy()
    labels[0, 0] = 200  # no class of ADE20K (0..150), Cityscapes (0..33) or synthetic (0..6)
    (root / case.annotation).write_bytes(_png(labels))
    parts = (case.annotation, "unknown category: label value 200")
    _raises(lambda: _build(name, root)[0], *parts)
    skipped = SkipBadSamples(_build(name, root, "skip"))[0]  # what an evaluation loader gets
    assert all(part in skipped.message for part in parts), skipped


# Segments that do not match the JSON


@pytest.mark.parametrize("name", PANOPTIC)
def test_panoptic_segments_that_do_not_match_the_json(copy_of, name):
    root, case = copy_of(name)
    original = json.loads((root / case.json).read_text())

    def check(modify, *parts):
        content = json.loads(json.dumps(original))
        modify(_first_annotation(content)["segments_info"])
        (root / case.json).write_text(json.dumps(content))
        _raises(lambda: _build(name, root)[0], case.annotation, *parts)

    first = _first_annotation(original)["segments_info"][0]["id"]
    check(lambda s: s.append({"id": 4242, "category_id": s[0]["category_id"]}), "4242", "absent")
    check(lambda s: s.pop(0), f"segment id {first} of the PNG not in its segments_info")
    check(lambda s: s.append(dict(s[0])), f"segment id {first} listed more than once")

    (root / case.json).write_text(json.dumps(original))
    gray = np.zeros(_size(root, case), np.uint8)
    (root / case.annotation).write_bytes(_png(gray))
    _raises(lambda: _build(name, root)[0], case.annotation, "must be RGB", "mode L")


def test_instance_segmentations_that_do_not_fit(copy_of):
    root, case = copy_of("coco_instance")
    original = json.loads((root / case.json).read_text())

    def read_with(segmentation):
        content = json.loads(json.dumps(original))
        content["annotations"][0]["segmentation"] = segmentation
        (root / case.json).write_text(json.dumps(content))
        return _build("coco_instance", root)[0]

    where = (case.json, "annotation 1 of image 139")
    _raises(lambda: read_with([[0, 0, 4, 0, 4]]), *where, "list of x, y numbers")
    _raises(lambda: read_with({"counts": [48], "size": [5, 8]}), *where, "RLE size [5, 8]")
    _raises(lambda: read_with({"counts": "!!", "size": [6, 8]}), *where, "malformed RLE")
    # pycocotools would decode runs short of the image from uninitialised memory.
    _raises(lambda: read_with({"counts": [3, 3], "size": [6, 8]}), *where, "cover 6 pixels")
    _raises(lambda: read_with({"counts": "04", "size": [6, 8]}), *where, "cover 4 pixels")
    _raises(lambda: read_with("person"), *where, "polygons or an RLE")
    # A polygon of two points has no area: the annotation is left out, the image stays.
    _, target = read_with([[0, 0, 4, 4]])
    assert target["labels"].tolist() == [1] and target["masks"].shape == (1, 6, 8)


# An image with no annotations


@pytest.mark.parametrize("name", list(CASES))
def test_image_without_annotations_has_empty_targets(copy_of, name):
    root, case = copy_of(name)
    height, width = _size(root, case)
    if case.is_instance:
        content = json.loads((root / case.json).read_text())
        first = content["images"][0]["id"]
        content["annotations"] = [a for a in content["annotations"] if a["image_id"] != first]
        (root / case.json).write_text(json.dumps(content))
    elif name in PANOPTIC:
        content = json.loads((root / case.json).read_text())
        _first_annotation(content)["segments_info"] = []
        (root / case.json).write_text(json.dumps(content))
        (root / case.annotation).write_bytes(_png(_ids_to_rgb(np.zeros((height, width), int))))
    else:  # every pixel unlabelled (value 0 in ADE20K and Cityscapes, 255 in synthetic)
        value = 255 if name.startswith("synthetic") else 0
        (root / case.annotation).write_bytes(_png(np.full((height, width), value)))
    image, target = _build(name, root)[0]
    assert image.shape == (3, height, width)
    assert target["masks"].shape == (0, height, width) and target["masks"].dtype == torch.bool
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["is_crowd"].shape == (0,)


def test_image_without_annotations_trains_on_no_object(copy_of):
    root, case = copy_of("coco_panoptic")
    content = json.loads((root / case.json).read_text())
    content["annotations"][0]["segments_info"] = []
    (root / case.json).write_text(json.dumps(content))
    (root / case.annotation).write_bytes(_png(np.zeros((6, 8, 3))))
    transforms = TrainTransforms((8, 8), scale_range=(0.5, 1.5), color_jitter=True)
    torch.manual_seed(0)
    dataset = DATASET_LAYOUTS["coco_panoptic"](root, "val", transforms)
    (_, empty), (_, full) = dataset[0], dataset[1]
    assert empty["masks"].shape == (0, 8, 8) and len(full["labels"]) == 1

    num_classes, queries = len(dataset.categories), 4
    mask_logits = torch.randn(2, queries, 4, 4, requires_grad=True)
    class_logits = torch.randn(2, queries, num_classes + 1, requires_grad=True)
    criterion = MaskClassificationLoss(num_classes, num_points=16)
    targets = [{"masks": t["masks"], "labels": t["labels"]} for t in (empty, full)]
    for batch in ([targets[0]], targets):
        b = len(batch)
        losses = criterion(
            [{"mask_logits": mask_logits[:b], "class_logits": class_logits[:b]}], batch
        )
        assert all(torch.isfinite(v) for v in losses.values()), losses
        mask_logits.grad = class_logits.grad = None
        losses["loss"].backward()
        assert torch.isfinite(mask_logits.grad).all() and torch.isfinite(class_logits.grad).all()
        # The empty image's queries all learn "no object".
        assert class_logits.grad[0, :, num_classes].lt(0).all()


# The dataset.bad_samples policy in the training stream and in evaluation


def _cfg(root: Path, policy: str, workers: int = 0, *extra: str):
    return get_cfg(
        overrides=[
            "dataset.name=synthetic_panoptic",
            f"dataset.root={root}",
            "dataset.train_split=val",
            f"dataset.bad_samples={policy}",
            "input.image_size=[16, 16]",
            "solver.batch_size_per_device=2",
            "test.batch_size=1",
            f"dataloader.num_workers={workers}",
            *extra,
        ]
    )


def _break_first_image(root: Path) -> str:
    path = root / CASES["synthetic_panoptic"].image
    path.write_bytes(path.read_bytes()[:100])
    return str(path)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_stream_replaces_and_counts_bad_samples(copy_of, workers):
    root, _ = copy_of("synthetic_panoptic")
    bad = _break_first_image(root)
    cfg = _cfg(root, "skip", workers)
    loader = build_train_loader(cfg, start_iter=0, accumulation=1, rank=0, world=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = iter(loader)
        batches = [next(stream) for _ in range(3)]  # 3 epochs of the 2-image split
        del stream
    for images, targets in batches:
        assert [t["file_name"] for t in targets] == ["000002.jpg"] * 2
        assert all(image.shape == (3, 16, 16) for image in images)
        assert all("replaced_bad_samples" not in t for t in targets)
    assert len(loader.skipped) == 3 and all(bad in m and "truncated" in m for m in loader.skipped)
    messages = [str(w.message) for w in caught if w.category is BadSampleWarning]
    assert len(messages) == 1 and bad in messages[0]

    if workers == 0:  # the replacement depends only on the seed and the position: resumable
        resumed = next(iter(build_train_loader(cfg, 2, 1, 0, 1)))
        for image, target, again, again_target in zip(*batches[2], *resumed):
            assert torch.equal(image, again)
            assert torch.equal(target["masks"], again_target["masks"])


def test_training_stream_stops_or_gives_up(copy_of):
    root, _ = copy_of("synthetic_panoptic")
    bad = _break_first_image(root)
    for workers in (0, 1):
        stop = build_train_loader(_cfg(root, "stop", workers), 0, 1, 0, 1)
        _raises(lambda stop=stop: next(iter(stop)), bad, "truncated")
    second = root / "images/val/000002.jpg"
    second.write_bytes(b"junk")
    loader = build_train_loader(_cfg(root, "skip"), 0, 1, 0, 1)
    _raises(lambda: next(iter(loader)), "none of the 2 samples", bad)


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_leaves_bad_images_out_and_counts_them(copy_of, workers):
    root, _ = copy_of("synthetic_panoptic")
    bad = _break_first_image(root)
    cfg = _cfg(root, "skip", workers)
    dataset = build_dataset(cfg, train=False)
    loader = build_test_loader(cfg, dataset)
    assert isinstance(loader.dataset, SkipBadSamples) and loader.dataset.categories
    with pytest.warns(BadSampleWarning, match="000001.jpg"):
        seen = [t["file_name"] for _, targets in loader for t in targets]
    assert seen == ["000002.jpg"]
    assert len(loader.skipped) == 1 and bad in loader.skipped[0]
    # Counted per pass: a second pass counts the image again, once.
    assert [t["file_name"] for _, targets in loader for t in targets] == ["000002.jpg"]
    assert len(loader.skipped) == 1

    stop = _cfg(root, "stop", workers)
    loader = build_test_loader(stop, build_dataset(stop, train=False))
    _raises(lambda: list(loader), bad, "truncated")


def test_bad_samples_policy_is_checked(copy_of):
    root, _ = copy_of("synthetic_panoptic")
    with pytest.raises(ConfigError, match=r"'dataset.bad_samples' must be one of stop, skip"):
        _cfg(root, "skipp")
    cfg = _cfg(root, "stop")
    cfg.dataset.bad_samples = "skipp"  # set after the config was checked
    with pytest.raises(ValueError, match=r"dataset.bad_samples must be one of.*'skipp'"):
        build_dataset(cfg, train=False)
    with pytest.raises(ConfigError, match=r"'dataset.bad_sample'.*dataset.bad_samples"):
        get_cfg(overrides=["dataset.bad_sample=skip"])
    with pytest.raises(ConfigError, match=r"'dataset.bad_samples' expects str"):
        get_cfg(overrides=["dataset.bad_samples=1"])


# Archive members and JSON file names that point outside their folder


def test_file_name_escaping_its_folder_is_refused_whatever_the_policy(copy_of, tmp_path):
    root, case = copy_of("coco_panoptic")
    (tmp_path / "secret.jpg").write_bytes(b"x")

    def escape(content):
        content["images"][0]["file_name"] = "../../secret.jpg"

    _write_modified_json(root / case.json, root / case.json, escape)
    for policy in ("stop", "skip"):
        dataset = SkipBadSamples(_build("coco_panoptic", root, policy))
        with pytest.raises(ValueError, match=r"'\.\./\.\./secret\.jpg' escapes its folder"):
            dataset[0]


# Checkpoints of another architecture or number of classes


def test_checkpoint_of_another_architecture_or_classes_names_the_file(tmp_path):
    model, _ = tiny_model()
    for name, other, expected in (
        ("classes.pth", tiny_model(classes=9)[0], "class_head: 2 wrong shape"),
        ("dinov3.pth", tiny_model(backbone=DINOV3)[0], "missing"),
    ):
        torch.save(other.state_dict(), tmp_path / name)
        with pytest.raises(ValueError) as error:
            load_checkpoint(model, tmp_path / name)
        message = str(error.value)
        assert str(tmp_path / name) in message and "does not match the model" in message
        assert expected in message
