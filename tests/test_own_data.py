"""A user's own data at any paths (dataset.train / dataset.test / dataset.classes): each format
trained a few iterations and evaluated, classes read from the data, and the checks that stop a
run before its first iteration."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eomt.config import ConfigError
from eomt.data import synthetic_split_paths
from eomt.data.build import build_dataset, check_config_dataset
from eomt.engine.trainer import Trainer
from eomt.weights.files import read_checkpoint

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


@pytest.mark.parametrize(
    "fmt, override, error, message",
    [
        ("coco_panoptic", "dataset.train.masks=fields/nothing", FileNotFoundError,
         r"dataset.train.masks: .*fields/nothing not found"),
        ("coco_panoptic", "dataset.classes=classes.txt", ValueError,
         r"dataset.classes: dataset.name coco_panoptic reads no classes \(it reads images, "
         r"annotations, masks\)"),
        ("semantic", "dataset.classes=", ValueError,
         r"dataset.classes is not set: dataset.name semantic reads your own files"),
        ("semantic", "dataset.test.annotations=x.json", ValueError,
         r"dataset.test.annotations: dataset.name semantic reads no annotations"),
    ],
)  # fmt: skip
def test_config_keys_of_own_files_are_checked(tiny_cfg, own_root, fmt, override, error, message):
    cfg = tiny_cfg(*own(own_root, fmt, override))
    with pytest.raises(error, match=message):
        build_dataset(cfg, train=override.startswith("dataset.train"))


def test_check_command_reads_the_config(tiny_cfg, own_root, capsys):
    assert check_config_dataset(tiny_cfg(*own(own_root, "coco_panoptic")))
    out = capsys.readouterr().out
    assert f"found   masks: {own_root}/fields/segments" in out
    assert "8 images, 7 classes\n" in out and "4 images, 7 classes\n" in out
    assert not check_config_dataset(tiny_cfg(*own(own_root, "semantic", "dataset.classes=no.txt")))
    assert "FAILED: dataset.classes: " in capsys.readouterr().out


def test_check_command_line_with_config_and_overrides(tiny_cfg, own_root, tmp_path, capsys):
    sys.path.insert(0, "datasets")
    import check_dataset

    sys.path.pop(0)
    config_file = tmp_path / "mine.yaml"
    OmegaConf.save(tiny_cfg(*own(own_root, "coco_panoptic")), config_file)
    semantic = [o for o in own(own_root, "semantic") if o.startswith("dataset.")]
    cleared = ["dataset.train.annotations=", "dataset.test.annotations="]
    args = ["--config-file", str(config_file), *semantic, *cleared, "--samples", "1"]
    assert check_dataset.main(check_dataset.parse_args(args)) == 0
    assert "semantic / train" in capsys.readouterr().out
    assert check_dataset.main(check_dataset.parse_args(["synthetic_panoptic", str(own_root)])) == 1
    with pytest.raises(SystemExit):
        check_dataset.parse_args(["no_such_layout", "root"])


def test_worked_example_fine_tune_evaluate_predict_and_score(tiny_cfg, own_root, tmp_path, capsys):
    """datasets/README.md, "Worked example", step by step, with a small model standing in for
    the COCO release (133 classes, official layout)."""
    from eomt.modeling import build_model
    from eomt.weights.export import official_state_dict
    from tests.test_run_refusals import train_net
    from tools import evaluate, predict

    sys.path.insert(0, "datasets")
    import check_dataset

    sys.path.pop(0)
    torch.manual_seed(0)  # the stand-in release, the same whatever ran before
    release = build_model(tiny_cfg("model.num_classes=133"))
    torch.save(official_state_dict(release), tmp_path / "coco_release.bin")
    cfg = tiny_cfg(
        *own(own_root, "coco_panoptic"),
        f"model.weights={tmp_path / 'coco_release.bin'}",
        "model.weights_strict=false",
        "solver.max_iter=30",
        "checkpoint_period=30",
        "test.score_threshold=0.0",  # a model this short-trained: keep its segments
        "test.overlap_threshold=0.0",
        f"output_dir={tmp_path / 'run'}",
    )
    config_file = tmp_path / "my_data.yaml"
    OmegaConf.save(cfg, config_file)
    args = ["--config-file", str(config_file)]

    # 1. Check; 2. train, told what was loaded.
    assert check_dataset.main(check_dataset.parse_args(args)) == 0
    capsys.readouterr()
    train_net.main(train_net.parse_args(args))
    out = capsys.readouterr().out
    total = len(release.state_dict())
    assert f"loaded {total - 2} of {total} tensors; kept their initialisation" in out
    assert "class_head: 2 wrong shape: class_head.weight: file (134, 32), model (8, 32)" in out

    # 3. Evaluate the last checkpoint.
    train_net.main(train_net.parse_args([*args, "--eval-only", "--resume"]))
    evaluated = json.loads((tmp_path / "run" / "results.json").read_text())["panoptic"]
    assert evaluated["PQ"] > 0, evaluated

    # 4. Predict new images, named by file stem.
    new = tmp_path / "new_photos"
    new.mkdir()
    shutil.copy(own_root / "holdout" / "photos" / "000002.jpg", new / "street.jpg")
    weights = str(tmp_path / "run" / "model_0000030.pth")
    predict.main(
        predict.parse_args(
            [
                "--weights",
                weights,
                "--input",
                str(new),
                "--output",
                str(tmp_path / "predictions"),
                "--quiet",
            ]
        )
    )
    assert (tmp_path / "predictions" / "panoptic" / "street.png").is_file()

    # 5. Predict the val images with the ground truth's ids and score them: step 3's PQ.
    holdout = own_root / "holdout"
    predict.main(
        predict.parse_args(
            [
                "--weights",
                weights,
                "--input",
                str(holdout / "photos"),
                "--coco-json",
                str(holdout / "panoptic.json"),
                "--output",
                str(tmp_path / "val"),
                "--batch-size",
                str(cfg.test.batch_size),
                "--quiet",
            ]
        )
    )
    scored = evaluate.main(
        [
            "panoptic",
            "--gt-json",
            str(holdout / "panoptic.json"),
            "--gt-dir",
            str(holdout / "segments"),
            "--pred-json",
            str(tmp_path / "val" / "panoptic.json"),
            "--pred-dir",
            str(tmp_path / "val" / "panoptic"),
            "--workers",
            "0",
        ]
    )
    assert (scored["All"]["PQ"], scored["All"]["SQ"], scored["All"]["RQ"]) == (
        evaluated["PQ"],
        evaluated["SQ"],
        evaluated["RQ"],
    )
