"""A user's own data at any paths (dataset.train / dataset.test / dataset.classes): each format
trained a few iterations and evaluated, classes read from the data, and the checks that stop a
run before its first iteration."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from eomt.config import ConfigError
from eomt.data import synthetic_split_paths
from eomt.data.build import build_dataset, check_config_dataset
from eomt.engine.checkpoint import read_checkpoint
from eomt.engine.trainer import Trainer

NAMES = ["disc", "rectangle", "triangle", "star", "grass", "water", "sand"]


@pytest.fixture(scope="module")
def own_root(synthetic_root, tmp_path_factory):
    """The synthetic dataset copied to names nothing like COCO's, as a user's data would be."""
    root = tmp_path_factory.mktemp("my_data")
    for split, name in (("train", "fields"), ("val", "holdout")):
        paths = synthetic_split_paths(synthetic_root, split)
        shutil.copytree(paths["image_dir"], root / name / "photos")
        shutil.copytree(paths["panoptic_png_dir"], root / name / "segments")
        shutil.copytree(paths["semantic_dir"], root / name / "labels")
        shutil.copy(paths["panoptic_json"], root / name / "panoptic.json")
        shutil.copy(paths["instance_json"], root / name / "objects.json")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root


def own(root: Path, fmt: str, *extra: str) -> list[str]:
    """Overrides that point the tiny config at the copies, in the format `fmt`."""
    annotations = {"coco_panoptic": "panoptic.json", "coco_instance": "objects.json"}.get(fmt)
    masks = {"coco_panoptic": "segments", "semantic": "labels"}.get(fmt)
    overrides = [f"dataset.name={fmt}", f"dataset.root={root}", "model.num_classes=0"]
    for section, folder in (("train", "fields"), ("test", "holdout")):
        overrides.append(f"dataset.{section}.images={folder}/photos")
        if annotations:
            overrides.append(f"dataset.{section}.annotations={folder}/{annotations}")
        if masks:
            overrides.append(f"dataset.{section}.masks={folder}/{masks}")
    if fmt == "semantic":
        overrides += ["dataset.classes=classes.txt", "task=semantic", "test.metrics=[semantic]"]
    if fmt == "coco_instance":
        overrides += ["task=instance", "test.metrics=[instance]"]
    return [*overrides, "solver.max_iter=2", *extra]


def test_own_panoptic_files_train_exactly_as_the_same_data_in_its_layout(tiny_cfg, own_root):
    reference = Trainer(tiny_cfg("solver.max_iter=2", "test.metrics=[panoptic, semantic]"))
    expected = reference.train()
    trainer = Trainer(
        tiny_cfg(
            *own(own_root, "coco_panoptic", "test.metrics=[panoptic, semantic]"),
            "output_dir=" + str(own_root / "run_panoptic"),
        )
    )
    assert trainer.cfg.model.num_classes == 7  # from the JSON
    results = trainer.train()
    assert results["panoptic"]["PQ"] == expected["panoptic"]["PQ"]
    assert results["semantic"]["mIoU"] == expected["semantic"]["mIoU"]
    for a, b in zip(reference.model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)
    saved = read_checkpoint(own_root / "run_panoptic" / "model_0000002.pth")
    assert saved["cfg"]["model"]["num_classes"] == 7
    assert [c["name"] for c in saved["categories"]] == NAMES


@pytest.mark.parametrize("fmt", ["coco_instance", "semantic"])
def test_own_instance_and_semantic_files_train_and_evaluate(tiny_cfg, own_root, fmt, tmp_path):
    trainer = Trainer(tiny_cfg(*own(own_root, fmt), f"output_dir={tmp_path / fmt}"))
    results = trainer.train()
    metric, key = {"coco_instance": ("instance", "AP"), "semantic": ("semantic", "mIoU")}[fmt]
    assert 0.0 <= results[metric][key] <= 100.0
    categories = trainer.test_set.categories
    if fmt == "coco_instance":  # the 4 thing classes of the instance JSON, ids kept
        assert trainer.cfg.model.num_classes == 4
        assert [(c["id"], c["name"]) for c in categories] == [
            (1, "disc"),
            (2, "rectangle"),
            (3, "triangle"),
            (4, "star"),
        ]
    else:  # the class list, in label order, all stuff
        assert trainer.cfg.model.num_classes == 7
        assert [c["name"] for c in categories] == NAMES
        assert not any(c["isthing"] for c in categories)
    assert (tmp_path / fmt / "model_0000002.pth").is_file()


def test_semantic_labels_follow_the_class_list_and_offset(tiny_cfg, own_root, synthetic_root):
    cfg = tiny_cfg(*own(own_root, "semantic"))
    reference = build_dataset(tiny_cfg("dataset.name=synthetic_semantic"), train=False)
    dataset = build_dataset(cfg, train=False)
    for index in range(len(dataset)):
        image, target = dataset[index]
        expected_image, expected = reference[index]
        assert torch.equal(image, expected_image)
        assert target["labels"].tolist() == expected["labels"].tolist()
        assert torch.equal(target["masks"], expected["masks"])
    # With offset 1, value v is class v - 1: value 0 becomes ignored, 1 is the first class.
    shifted = build_dataset(tiny_cfg(*own(own_root, "semantic", "dataset.label_offset=1")), False)
    labels = dataset.read_label_map(0)
    expected = labels - 1
    expected[(labels == 255) | (labels == 0)] = 255
    assert (shifted.read_label_map(0) == expected).all()


def test_class_count_that_does_not_fit_stops_before_training(tiny_cfg, own_root):
    with pytest.raises(
        ConfigError,
        match=r"model.num_classes=5 does not fit the dataset: .*holdout/panoptic.json has 7 "
        r"classes \(set model.num_classes=7",
    ):
        Trainer(tiny_cfg(*own(own_root, "coco_panoptic", "model.num_classes=5")))
    with pytest.raises(ConfigError, match=r"classes.txt has 7 classes"):
        Trainer(tiny_cfg(*own(own_root, "semantic", "model.num_classes=8")))


def test_training_and_evaluation_classes_must_agree(tiny_cfg, own_root, tmp_path):
    # An evaluation JSON whose third class is another one: stopped before the first iteration.
    content = json.loads((own_root / "holdout" / "panoptic.json").read_text())
    content["categories"][2]["name"] = "cone"
    (tmp_path / "renamed.json").write_text(json.dumps(content))
    overrides = own(own_root, "coco_panoptic", f"dataset.test.annotations={tmp_path}/renamed.json")
    trainer = Trainer(tiny_cfg(*overrides))
    with pytest.raises(
        ValueError,
        match=r"the training split's classes \(.*fields/panoptic.json\) differ from the "
        r"evaluation split's \(.*renamed.json\): label 2 is \(3, 'triangle', True\) against "
        r"\(3, 'cone', True\)",
    ):
        trainer.train()
    assert trainer.iteration == 0 and not list(Path(trainer.cfg.output_dir).glob("model_*"))


def test_config_keys_of_own_files_are_checked(tiny_cfg, own_root):
    with pytest.raises(FileNotFoundError, match=r"dataset.train.masks: .*fields/nothing not found"):
        build_dataset(
            tiny_cfg(*own(own_root, "coco_panoptic", "dataset.train.masks=fields/nothing")), True
        )
    with pytest.raises(
        ValueError,
        match=r"dataset.classes: dataset.name coco_panoptic reads no "
        r"classes \(it reads images, annotations, masks\)",
    ):
        build_dataset(
            tiny_cfg(*own(own_root, "coco_panoptic", "dataset.classes=classes.txt")), False
        )
    with pytest.raises(
        ValueError,
        match=r"dataset.classes is not set: dataset.name semantic reads "
        r"your own files",
    ):
        build_dataset(tiny_cfg(*own(own_root, "semantic", "dataset.classes=")), False)
    with pytest.raises(
        ValueError, match=r"dataset.test.annotations: dataset.name semantic reads no"
    ):
        build_dataset(
            tiny_cfg(*own(own_root, "semantic", "dataset.test.annotations=x.json")), False
        )


def test_check_command_reads_the_config(tiny_cfg, own_root, capsys):
    assert check_config_dataset(tiny_cfg(*own(own_root, "coco_panoptic")))
    out = capsys.readouterr().out
    assert f"found   masks: {own_root}/fields/segments" in out
    assert "8 images, 7 classes\n" in out and "4 images, 7 classes\n" in out
    assert not check_config_dataset(tiny_cfg(*own(own_root, "semantic", "dataset.classes=no.txt")))
    assert "FAILED: dataset.classes: " in capsys.readouterr().out
