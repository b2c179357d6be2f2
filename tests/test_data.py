"""Synthetic generator, dataset readers and training augmentation."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from eomt.data import (
    SYNTHETIC_CATEGORIES,
    COCOInstanceDataset,
    COCOPanopticDataset,
    SemanticDataset,
    TrainTransforms,
    collate,
    generate_synthetic_dataset,
    load_image,
    synthetic_split_paths,
)
from eomt.data.coco_panoptic import read_panoptic_png
from eomt.data.synthetic import THING_IDS, render_sample
from eomt.data.transforms import BRIGHTNESS_DELTA, photometric_jitter

NUM_TRAIN, NUM_VAL = 6, 4
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(root, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=3)
    return root


def _panoptic(root: Path, split: str = "train", transforms=None) -> COCOPanopticDataset:
    paths = synthetic_split_paths(root, split)
    return COCOPanopticDataset(
        paths["image_dir"], paths["panoptic_json"], paths["panoptic_png_dir"], transforms
    )


def _instance(root: Path, split: str = "train") -> COCOInstanceDataset:
    paths = synthetic_split_paths(root, split)
    return COCOInstanceDataset(paths["image_dir"], paths["instance_json"])


def _semantic(root: Path, split: str = "train") -> SemanticDataset:
    paths = synthetic_split_paths(root, split)
    return SemanticDataset(paths["image_dir"], paths["semantic_dir"], SYNTHETIC_CATEGORIES)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# Synthetic generator


def test_generation_is_byte_identical_and_skipped_when_complete(synthetic_root, tmp_path):
    again = tmp_path / "again"
    assert generate_synthetic_dataset(again, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=3)
    first, second = _file_bytes(synthetic_root), _file_bytes(again)
    assert len(first) == 3 * (NUM_TRAIN + NUM_VAL) + 4 + 1  # jpg+png+png per image, JSONs, marker
    assert first == second
    assert not generate_synthetic_dataset(again, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=3)

    # Different parameters regenerate in place and leave no stale files behind.
    assert generate_synthetic_dataset(again, num_train=2, num_val=1, seed=4)
    regenerated = _file_bytes(again)
    assert len(regenerated) == 3 * 3 + 4 + 1
    assert regenerated["images/train/000001.jpg"] != first["images/train/000001.jpg"]


def test_splits_use_different_random_streams(synthetic_root):
    train_image = (synthetic_root / "images/train/000001.jpg").read_bytes()
    val_image = (synthetic_root / "images/val/000001.jpg").read_bytes()
    assert train_image != val_image


def test_panoptic_json_agrees_with_pngs(synthetic_root):
    content = json.loads((synthetic_root / "annotations/panoptic_train.json").read_text())
    category_ids = [c["id"] for c in content["categories"]]
    assert category_ids == [c["id"] for c in SYNTHETIC_CATEGORIES]
    assert category_ids != list(range(1, len(category_ids) + 1))  # the mapping is exercised
    assert len(content["images"]) == len(content["annotations"]) == NUM_TRAIN
    is_thing = {c["id"]: c["isthing"] for c in content["categories"]}
    for image, annotation in zip(content["images"], content["annotations"]):
        assert 128 <= image["width"] <= 192 and 128 <= image["height"] <= 192
        segment_ids = read_panoptic_png(
            synthetic_root / "annotations/panoptic_train" / annotation["file_name"]
        )
        assert segment_ids.shape == (image["height"], image["width"])
        segments = annotation["segments_info"]
        assert set(np.unique(segment_ids)) - {0} == {s["id"] for s in segments}
        num_things = sum(is_thing[s["category_id"]] for s in segments)
        assert num_things <= 7
        assert sum(1 - is_thing[s["category_id"]] for s in segments) >= 1
        for segment in segments:
            mask = segment_ids == segment["id"]
            assert segment["area"] == mask.sum() >= 40
            x, y, w, h = segment["bbox"]
            rows, cols = np.nonzero(mask)
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())


def test_instance_json_is_valid_coco(synthetic_root):
    json_file = synthetic_root / "annotations/instances_val.json"
    coco = COCO(str(json_file))
    panoptic = json.loads((synthetic_root / "annotations/panoptic_val.json").read_text())
    thing_ids = {c["id"] for c in SYNTHETIC_CATEGORIES if c["isthing"]}
    assert set(coco.getCatIds()) == thing_ids
    thing_segments = [
        (annotation["image_id"], segment)
        for annotation in panoptic["annotations"]
        for segment in annotation["segments_info"]
        if segment["category_id"] in thing_ids
    ]
    annotations = coco.loadAnns(coco.getAnnIds())
    assert len(annotations) == len(thing_segments)
    for annotation, (image_id, segment) in zip(annotations, thing_segments):
        assert isinstance(annotation["segmentation"]["counts"], str)
        assert annotation["image_id"] == image_id
        assert annotation["category_id"] == segment["category_id"]
        assert annotation["iscrowd"] == segment["iscrowd"]
        assert annotation["area"] == segment["area"]
        assert annotation["bbox"] == [float(v) for v in segment["bbox"]]


def test_sample_content_statistics():
    rng = np.random.default_rng(0)
    thing_counts, crowd, areas, stuff_per_image = [], 0, [], []
    labels = set()
    for _ in range(100):
        image, segment_ids, segments = render_sample(rng)
        assert image.dtype == np.uint8 and image.shape == (*segment_ids.shape, 3)
        things = [s for s in segments if s["category_id"] in THING_IDS]
        thing_counts.append(len(things))
        stuff_per_image.append(len(segments) - len(things))
        crowd += sum(s["iscrowd"] for s in things)
        areas += [int((segment_ids == s["id"]).sum()) for s in things]
        labels |= {s["category_id"] for s in segments}
    assert labels == {c["id"] for c in SYNTHETIC_CATEGORIES}
    assert min(areas) >= 40 and max(areas) > 2000
    assert np.mean(thing_counts) > 3.5 and max(thing_counts) == 7
    assert set(stuff_per_image) <= {1, 2, 3} and np.mean(stuff_per_image) > 2
    assert 0 < crowd < 0.1 * sum(thing_counts)


def test_prepare_synthetic_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "prepare_synthetic", REPO_ROOT / "datasets/prepare_synthetic.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--output", str(tmp_path), "--num-train", "2", "--num-val", "1", "--seed", "5"]
    cli.main(cli.parse_args(argv))
    assert "Wrote 2 train + 1 val" in capsys.readouterr().out
    assert json.loads((tmp_path / "synthetic_complete.json").read_text())["seed"] == 5
    cli.main(cli.parse_args(argv))
    assert "nothing to do" in capsys.readouterr().out


# Readers


def _check_item(image: torch.Tensor, target: dict, num_classes: int) -> None:
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert 0 <= image.min() and image.max() <= 1
    num_masks = len(target["labels"])
    assert target["masks"].dtype == torch.bool
    assert target["masks"].shape == (num_masks, *image.shape[1:])
    assert target["labels"].dtype == torch.int64
    assert ((0 <= target["labels"]) & (target["labels"] < num_classes)).all()
    assert target["is_crowd"].dtype == torch.bool and target["is_crowd"].shape == (num_masks,)
    assert isinstance(target["image_id"], int) and isinstance(target["file_name"], str)
    assert target["masks"].flatten(1).any(dim=1).all()


def test_readers_return_shared_convention(synthetic_root):
    panoptic, instance, semantic = (
        _panoptic(synthetic_root),
        _instance(synthetic_root),
        _semantic(synthetic_root),
    )
    assert len(panoptic) == len(instance) == len(semantic) == NUM_TRAIN
    assert panoptic.categories == SYNTHETIC_CATEGORIES
    assert [c["id"] for c in instance.categories] == [1, 2, 3, 4]
    assert all(c["isthing"] == 1 and len(c["color"]) == 3 for c in instance.categories)
    for dataset in (panoptic, instance, semantic):
        for index in range(2):
            image, target = dataset[index]
            _check_item(image, target, len(dataset.categories))
    image, target = panoptic[0]
    assert target["image_id"] == panoptic.image_ids[0] == 1
    assert target["file_name"] == "000001.jpg"
    assert torch.equal(image, load_image(synthetic_root / "images/train/000001.jpg"))


def test_panoptic_masks_tile_the_image(synthetic_root):
    for _, target in _panoptic(synthetic_root, "val"):
        # Non-overlapping, and the synthetic images have no void pixels.
        assert (target["masks"].sum(dim=0) == 1).all()


def test_panoptic_and_instance_readers_agree_on_things(synthetic_root):
    panoptic, instance = _panoptic(synthetic_root), _instance(synthetic_root)
    num_things = len(instance.categories)
    for (panoptic_image, panoptic_target), (instance_image, instance_target) in zip(
        panoptic, instance
    ):
        assert torch.equal(panoptic_image, instance_image)
        is_thing = panoptic_target["labels"] < num_things
        assert torch.equal(panoptic_target["masks"][is_thing], instance_target["masks"])
        assert torch.equal(panoptic_target["labels"][is_thing], instance_target["labels"])
        assert torch.equal(panoptic_target["is_crowd"][is_thing], instance_target["is_crowd"])
        assert instance_target["image_id"] == panoptic_target["image_id"]


def test_semantic_reader_matches_panoptic_render(synthetic_root):
    panoptic, semantic = _panoptic(synthetic_root), _semantic(synthetic_root)
    for index in range(len(panoptic)):
        _, panoptic_target = panoptic[index]
        _, semantic_target = semantic[index]
        rendered = torch.full(panoptic_target["masks"].shape[1:], 255, dtype=torch.int64)
        for mask, label in zip(panoptic_target["masks"], panoptic_target["labels"]):
            rendered[mask] = label
        assert torch.equal(torch.from_numpy(semantic.read_label_map(index)), rendered)
        from_masks = torch.full_like(rendered, 255)
        for mask, label in zip(semantic_target["masks"], semantic_target["labels"]):
            from_masks[mask] = label
        assert torch.equal(from_masks, rendered)
        assert torch.equal(semantic_target["labels"], torch.unique(rendered))
        assert not semantic_target["is_crowd"].any()


def test_semantic_label_offset_and_ignore(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (4, 2)).save(tmp_path / "images/a.png")
    raw = np.array([[0, 1, 2, 3], [255, 2, 1, 0]], dtype=np.uint8)
    Image.fromarray(raw).save(tmp_path / "labels/a.png")
    categories = [{"id": 1, "name": "x", "isthing": 0, "color": [0, 0, 0]}] * 2
    dataset = SemanticDataset(
        tmp_path / "images", tmp_path / "labels", categories, label_offset=1, image_suffix=".png"
    )
    expected = np.array([[255, 0, 1, 255], [255, 1, 0, 255]])
    np.testing.assert_array_equal(dataset.read_label_map(0), expected)
    _, target = dataset[0]
    assert target["labels"].tolist() == [0, 1]
    assert torch.equal(target["masks"][1], torch.from_numpy(expected == 1))
    assert target["file_name"] == "a.png" and target["image_id"] == 0


def test_load_image_converts_modes_and_exif(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "gray.png")
    image = load_image(tmp_path / "gray.png")
    assert image.shape == (3, 3, 4) and image.dtype == torch.float32
    expected = torch.from_numpy(gray / 255).float()
    for channel in image:
        torch.testing.assert_close(channel, expected)

    Image.new("RGBA", (5, 2), (255, 0, 51, 10)).save(tmp_path / "rgba.png")
    torch.testing.assert_close(
        load_image(tmp_path / "rgba.png")[:, 0, 0], torch.tensor([1, 0, 0.2])
    )

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (8, 2)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (3, 8, 2)


# Reader errors


def test_missing_files_raise_with_the_path(synthetic_root, tmp_path):
    paths = synthetic_split_paths(synthetic_root, "train")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        COCOPanopticDataset(
            paths["image_dir"], tmp_path / "nowhere.json", paths["panoptic_png_dir"]
        )
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        COCOInstanceDataset(paths["image_dir"], tmp_path / "nowhere.json")
    dataset = COCOPanopticDataset(tmp_path, paths["panoptic_json"], paths["panoptic_png_dir"])
    with pytest.raises(FileNotFoundError, match="000001.jpg"):
        dataset[0]
    dataset = COCOPanopticDataset(paths["image_dir"], paths["panoptic_json"], tmp_path)
    with pytest.raises(FileNotFoundError, match="000001.png"):
        dataset[0]
    with pytest.raises(FileNotFoundError, match="000001.png"):
        SemanticDataset(paths["image_dir"], tmp_path, SYNTHETIC_CATEGORIES)


def _write_modified_json(source: Path, destination: Path, modify) -> Path:
    content = json.loads(source.read_text())
    modify(content)
    destination.write_text(json.dumps(content))
    return destination


def test_unknown_category_raises(synthetic_root, tmp_path):
    paths = synthetic_split_paths(synthetic_root, "train")

    def break_panoptic(content):
        content["annotations"][1]["segments_info"][0]["category_id"] = 99

    bad_panoptic = _write_modified_json(paths["panoptic_json"], tmp_path / "p.json", break_panoptic)
    with pytest.raises(ValueError, match=r"p\.json.*unknown category id 99"):
        COCOPanopticDataset(paths["image_dir"], bad_panoptic, paths["panoptic_png_dir"])

    def break_instance(content):
        content["annotations"][0]["category_id"] = 10  # a stuff id: not in the instance JSON

    bad_instance = _write_modified_json(paths["instance_json"], tmp_path / "i.json", break_instance)
    with pytest.raises(ValueError, match=r"i\.json.*unknown category id 10"):
        COCOInstanceDataset(paths["image_dir"], bad_instance)


def test_inconsistent_annotations_raise(synthetic_root, tmp_path):
    paths = synthetic_split_paths(synthetic_root, "train")

    def drop_key(content):
        del content["annotations"][0]["segments_info"]

    missing_key = _write_modified_json(paths["panoptic_json"], tmp_path / "k.json", drop_key)
    with pytest.raises(ValueError, match="segments_info"):
        COCOPanopticDataset(paths["image_dir"], missing_key, paths["panoptic_png_dir"])

    def add_absent_segment(content):
        content["annotations"][0]["segments_info"].append(
            {"id": 123456, "category_id": 1, "iscrowd": 0}
        )

    absent = _write_modified_json(paths["panoptic_json"], tmp_path / "s.json", add_absent_segment)
    with pytest.raises(ValueError, match="segment id 123456"):
        COCOPanopticDataset(paths["image_dir"], absent, paths["panoptic_png_dir"])[0]

    png_dir = tmp_path / "pngs"
    png_dir.mkdir()
    Image.new("RGB", (7, 7)).save(png_dir / "000001.png")
    with pytest.raises(ValueError, match="000001.png: size"):
        COCOPanopticDataset(paths["image_dir"], paths["panoptic_json"], png_dir)[0]


# Training augmentation


def _square_sample(size=(40, 40), square=(8, 20, 4, 14)) -> tuple[torch.Tensor, dict]:
    """Channel 0 is 1 exactly on the square (top, bottom, left, right); mask 1 is the rest."""
    height, width = size
    top, bottom, left, right = square
    inside = torch.zeros(size, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    image = torch.zeros(3, height, width)
    image[0] = inside.float()
    image[1] = torch.linspace(0, 1, width).expand(height, width)
    target = {
        "masks": torch.stack([inside, ~inside]),
        "labels": torch.tensor([3, 5]),
        "is_crowd": torch.tensor([False, False]),
        "image_id": 7,
        "file_name": "square.jpg",
    }
    return image, target


def test_flip_and_crop_keep_masks_aligned_exactly():
    image, target = _square_sample()
    # Scale range chosen so that the resize is the identity: crop 24 of 40 without interpolation.
    transforms = TrainTransforms((24, 30), scale_range=(40 / 24, 40 / 24), color_jitter=False)
    flipped = cropped_square = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out_image, out_target = transforms(image, target)
        assert out_image.shape == (3, 24, 30)
        square_mask = out_target["masks"][out_target["labels"] == 3]
        if len(square_mask):
            assert torch.equal(square_mask[0], out_image[0] == 1)
            cropped_square += int(square_mask[0].sum() < 12 * 10)
        else:
            assert not (out_image[0] == 1).any()
        # The x ramp runs right-to-left after a flip.
        flipped += int(out_image[1, 0, 0] > out_image[1, 0, -1])
        assert out_target["image_id"] == 7 and out_target["file_name"] == "square.jpg"
    assert 5 < flipped < 25
    assert cropped_square > 0


def test_scale_jitter_output_size_and_alignment():
    image, target = _square_sample(size=(50, 70), square=(10, 40, 20, 50))
    transforms = TrainTransforms((32, 48), scale_range=(0.3, 2.0), color_jitter=True)
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_target = transforms(image, target)
        assert out_image.shape == (3, 32, 48) and out_image.dtype == torch.float32
        assert 0 <= out_image.min() and out_image.max() <= 1
        assert out_target["masks"].shape[1:] == (32, 48)
        assert out_target["masks"].dtype == torch.bool
        assert out_target["labels"].dtype == torch.int64
        # Masks tile the resized image; the padding belongs to no mask.
        coverage = out_target["masks"].sum(dim=0)
        assert coverage.max() <= 1
        assert (out_image[:, coverage == 0] == 0).all()


def test_scale_is_relative_to_the_crop_size():
    image, target = _square_sample(size=(20, 10))
    # Fitting 20x10 into 40x40 doubles it; scale 1 then needs padding on the right only.
    transforms = TrainTransforms((40, 40), scale_range=(1.0, 1.0), color_jitter=False)
    torch.manual_seed(0)
    out_image, out_target = transforms(image, target)
    coverage = out_target["masks"].any(dim=0)
    assert coverage[:, :20].all() and not coverage[:, 20:].any()


def test_transforms_are_reproducible_with_the_torch_seed():
    image, target = _square_sample()
    transforms = TrainTransforms((24, 24), scale_range=(0.5, 2.0), color_jitter=True)
    torch.manual_seed(11)
    first_image, first_target = transforms(image, target)
    torch.manual_seed(11)
    second_image, second_target = transforms(image, target)
    assert torch.equal(first_image, second_image)
    assert torch.equal(first_target["masks"], second_target["masks"])


def test_crowd_instances_are_dropped():
    image, target = _square_sample()
    target["is_crowd"] = torch.tensor([True, False])
    transforms = TrainTransforms((40, 40), scale_range=(1.0, 1.0), color_jitter=False)
    out_image, out_target = transforms(image, target)
    assert out_target["labels"].tolist() == [5]
    assert out_target["is_crowd"].tolist() == [False]
    # The crowd region stays in the image, just unsupervised.
    assert (out_image[0] == 1).sum() == 12 * 10


def test_empty_masks_dropped_and_empty_crops_redrawn():
    # A crop of 8x8 out of 40x40 misses the 16x16 corner square about 3 times in 4.
    image, target = _square_sample(square=(0, 16, 0, 16))
    only_corner = {
        key: value[:1] if torch.is_tensor(value) else value for key, value in target.items()
    }
    single_try = TrainTransforms((8, 8), scale_range=(5.0, 5.0), color_jitter=False, max_tries=1)
    retrying = TrainTransforms((8, 8), scale_range=(5.0, 5.0), color_jitter=False, max_tries=50)
    empty_single = empty_retrying = dropped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        _, out = single_try(image, only_corner)
        empty_single += int(len(out["labels"]) == 0)
        assert out["masks"].shape[0] == len(out["labels"]) == len(out["is_crowd"])
        torch.manual_seed(seed)
        _, out = retrying(image, only_corner)
        empty_retrying += int(len(out["labels"]) == 0)
        torch.manual_seed(seed)
        _, out = single_try(image, target)
        assert out["masks"].flatten(1).any(dim=1).all()
        dropped += int(out["labels"].tolist() == [5])
    assert empty_single >= 5 and empty_retrying == 0 and dropped >= 5


def test_photometric_jitter_on_gray_changes_brightness_only():
    # Contrast, saturation and hue leave a uniform gray image unchanged; brightness shifts it.
    gray = torch.full((3, 6, 5), 0.5)
    changed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = photometric_jitter(gray)
        assert out.shape == gray.shape
        torch.testing.assert_close(out, torch.full_like(gray, out[0, 0, 0].item()))
        assert abs(out[0, 0, 0] - 0.5) <= BRIGHTNESS_DELTA + 1e-6
        changed += int(not torch.allclose(out, gray))
    assert 3 <= changed <= 17
    for _ in range(10):
        out = photometric_jitter(torch.rand(3, 4, 4))
        assert 0 <= out.min() and out.max() <= 1


def test_collate_keeps_lists():
    samples = [_square_sample(), _square_sample(size=(10, 12))]
    images, targets = collate(samples)
    assert [tuple(i.shape) for i in images] == [(3, 40, 40), (3, 10, 12)]
    assert targets[1] is samples[1][1]


def test_panoptic_reader_applies_transforms(synthetic_root):
    transforms = TrainTransforms((64, 64), scale_range=(0.5, 1.5), color_jitter=True)
    torch.manual_seed(0)
    image, target = _panoptic(synthetic_root, transforms=transforms)[0]
    assert image.shape == (3, 64, 64)
    assert target["masks"].shape[1:] == (64, 64) and not target["is_crowd"].any()


def test_rle_of_reader_mask_matches_json(synthetic_root):
    instance = _instance(synthetic_root, "val")
    _, target = instance[0]
    annotations = instance.coco.imgToAnns[instance.image_ids[0]]
    for mask, annotation in zip(target["masks"], annotations):
        rle = mask_util.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        assert rle["counts"].decode("ascii") == annotation["segmentation"]["counts"]
