"""tools/predict.py and the Predictor on synthetic images: the files written and their content."""

import errno
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms.v2.functional import to_dtype

from eomt.cli import run_tool
from eomt.data import BadSampleError, BadSampleWarning, synthetic_split_paths
from eomt.deploy import streamed_json
from eomt.deploy.predictor import (
    ACCEPTED_IMAGES,
    Predictor,
    as_image_tensor,
    find_images,
    read_categories,
    unique_stems,
    write_predictions,
)
from eomt.engine.trainer import Trainer
from eomt.evaluation.instance import COCO_STATS
from eomt.evaluation.panoptic_io import read_panoptic_png
from eomt.tasks import instance, panoptic
from eomt.weights.files import save_weights
from tests.test_weights import CLASSES, L2, tiny_model
from tools.predict import main, parse_args

CATEGORIES = [
    {"id": 10 + i, "name": f"class{i}", "isthing": int(i < 3), "color": [40 * i, 200, 90]}
    for i in range(CLASSES)
]


def save_segmenting_tiny_model(folder):
    """A tiny random model that predicts segments (its mask logits shifted up, no score
    threshold), saved with CATEGORIES in `folder`/model.safetensors."""
    model, cfg = tiny_model()
    with torch.no_grad():  # random mask logits are mostly negative: shift them up
        model.upscale[-1].norm.bias.fill_(0.3)
        model.mask_head[4].bias.fill_(0.05)
    cfg.test.score_threshold = 0.0  # random weights: keep every segment
    cfg.test.overlap_threshold = 0.0
    return save_weights(model, cfg, CATEGORIES, folder / "model.safetensors")


@pytest.fixture
def weights(tmp_path):
    return save_segmenting_tiny_model(tmp_path)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 56)), ("b.jpg", (48, 48)), ("c.png", (30, 20))):
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(weights, inputs, output, *extra):
    return main(
        parse_args(
            [
                "--weights",
                str(weights),
                "--input",
                str(inputs),
                "--output",
                str(output),
                "--quiet",
                *extra,
            ]
        )
    )


def test_panoptic_pngs_json_overlays_and_queries(weights, image_dir, tmp_path):
    out = tmp_path / "out"
    run(weights, image_dir, out, "--batch-size", "2", "--show-queries", "2")
    content = json.loads((out / "panoptic.json").read_text())
    assert [i["file_name"] for i in content["images"]] == ["a.png", "b.jpg", "c.png"]
    assert content["categories"] == CATEGORIES
    assert len(content["annotations"]) == 3
    for annotation, info in zip(content["annotations"], content["images"]):
        seg = read_panoptic_png(out / "panoptic" / annotation["file_name"])
        assert seg.shape == (info["height"], info["width"])
        segments = annotation["segments_info"]
        assert segments, "a score threshold of 0 keeps segments"
        assert sorted(s["id"] for s in segments) == sorted(set(np.unique(seg).tolist()) - {0})
        for segment in segments:
            assert segment["area"] == int((seg == segment["id"]).sum())
            assert segment["category_id"] in {c["id"] for c in CATEGORIES}
    for name in ("a", "b", "c"):
        overlay = np.asarray(Image.open(out / "overlay" / f"{name}.png"))
        assert overlay.ndim == 3 and overlay.shape[2] == 3
        queries = Image.open(out / "queries" / f"{name}.png")
        # Two rows of L2 + 1 predictions, each wider than the image itself.
        assert queries.width > (L2 + 1) * 20


def test_semantic_and_instance_outputs(weights, image_dir, tmp_path):
    run(weights, image_dir / "*.png", tmp_path / "sem", "--task", "semantic", "--no-overlay")
    labels = np.asarray(Image.open(tmp_path / "sem" / "semantic" / "a.png"))
    assert labels.shape == (40, 56) and labels.max() < CLASSES
    assert sorted(p.name for p in (tmp_path / "sem" / "semantic").iterdir()) == ["a.png", "c.png"]
    assert not (tmp_path / "sem" / "overlay").exists()

    run(weights, image_dir / "b.jpg", tmp_path / "ins", "--task", "instance")
    results = json.loads((tmp_path / "ins" / "instances.json").read_text())
    assert results and all(r["image_id"] == "b" for r in results)  # named by file stem
    assert {r["category_id"] for r in results} <= {c["id"] for c in CATEGORIES[:3]}  # things
    decoded = mask_utils.decode(results[0]["segmentation"])
    assert decoded.shape == (48, 48)
    assert (tmp_path / "ins" / "overlay" / "b.png").is_file()


def test_batch_equals_single_images_and_inputs(weights, image_dir):
    predictor = Predictor.from_checkpoint(weights, device="cpu")
    assert predictor.categories == CATEGORIES
    paths = find_images(image_dir)
    batch = predictor.predict(paths, "semantic")
    for path, labels in zip(paths, batch):
        assert torch.equal(predictor(path, "semantic"), labels)
    assert find_images(image_dir / "b.jpg") == [image_dir / "b.jpg"]
    with pytest.raises(FileNotFoundError, match="no images"):
        find_images(image_dir / "*.gif")
    with pytest.raises(ValueError, match="unknown task"):
        predictor(paths[0], "depth")


def test_query_predictions_follow_the_masked_path(weights, image_dir):
    predictor = Predictor.from_checkpoint(weights, device="cpu")
    probs_before = predictor.model.attn_mask_probs.clone()
    masks, classes, queries, names = predictor.query_predictions(image_dir / "a.png", 3)
    assert masks.shape == (L2 + 1, 3, 40, 56) and classes.shape == (L2 + 1, 3, CLASSES + 1)
    assert names == ["before query block 0", "before query block 1", "final"]
    # The model is left as it was: unmasked inference, its own attention-mask probabilities.
    assert predictor.model.masked_attn == "anneal"
    assert torch.equal(predictor.model.attn_mask_probs, probs_before)
    # The queries shown are the most confident ones of the final prediction, best first.
    confidence = classes[-1].softmax(-1)[:, :-1].amax(-1)
    assert torch.equal(confidence, confidence.sort(descending=True).values)
    assert len(set(queries)) == 3


def test_categories_from_a_file_and_names(tmp_path):
    (tmp_path / "panoptic.json").write_text(json.dumps({"categories": CATEGORIES}))
    assert read_categories(tmp_path / "panoptic.json") == CATEGORIES
    assert len(read_categories("ade20k")) == 150
    with pytest.raises(FileNotFoundError, match="neither a file nor one of"):
        read_categories("coco")
    assert unique_stems([tmp_path / "x/a.png", tmp_path / "y/a.jpg"]) == ["a", "a_1"]


def test_unreadable_image_stops_keeping_earlier_predictions_or_is_skipped(
    weights, image_dir, tmp_path, capsys
):
    broken = image_dir / "b.jpg"
    broken.write_bytes(broken.read_bytes()[:60])
    message = (
        f"{broken}: image file is corrupt, truncated.*; stopped there: 1 predicted, 0 skipped, "
        f"1 failed, 1 not reached \\(the 1 predicted are in {tmp_path / 'stop' / 'panoptic.json'}; "
        "--bad-images skip leaves such images out\\)"
    )
    with pytest.raises(BadSampleError, match=message):
        run(weights, image_dir, tmp_path / "stop", "--no-overlay")
    # a.png, predicted before it in the same batch, is in a complete panoptic.json.
    done = json.load(open(tmp_path / "stop" / "panoptic.json"))
    assert [image["file_name"] for image in done["images"]] == ["a.png"]

    with pytest.warns(BadSampleWarning, match="b.jpg"):
        summary = run(weights, image_dir, tmp_path / "skip", "--bad-images", "skip", "--no-overlay")
    assert (summary.predicted, summary.skipped, summary.failed) == (2, 1, 0)
    assert capsys.readouterr().out.startswith(
        f"3 images: 2 predicted, 1 skipped, 0 failed -> {tmp_path / 'skip'} "
        "(panoptic.json, skipped_images.txt); the model ran in fp32"
    )
    written = json.load(open(tmp_path / "skip" / "panoptic.json"))
    assert [(i["id"], i["file_name"]) for i in written["images"]] == [
        ("a", "a.png"),
        ("c", "c.png"),
    ]
    assert [a["image_id"] for a in written["annotations"]] == ["a", "c"]
    listed = (tmp_path / "skip" / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 1 and str(broken) in listed[0]


POSITIONS = {"first": 0, "middle": 2, "end of a batch": 3, "last": 5, "alone": 0}


@pytest.mark.parametrize("bad_images", ["skip", "stop"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("position", POSITIONS)
def test_an_unreadable_image_costs_no_other_image_its_prediction(
    weights, tmp_path, position, batch_size, bad_images
):
    """Six images (batches of 4: [0-3], [4, 5]), or one alone, one of them unreadable: with
    skip every other image is predicted; with stop every image before it, and the error
    counts them."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    count = 1 if position == "alone" else 6
    for index in range(count):
        pixels = rng.integers(0, 256, size=(24 + 4 * index, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    bad = POSITIONS[position]
    (folder / f"{bad}.png").write_bytes(b"not a png")
    paths, out = find_images(folder), tmp_path / "out"
    predictor = Predictor.from_checkpoint(weights, device="cpu")
    kwargs = dict(batch_size=batch_size, overlay=False, progress=False, bad_images=bad_images)
    if bad_images == "skip":
        with pytest.warns(BadSampleWarning, match=f"{bad}.png"):
            summary = write_predictions(predictor, paths, out, **kwargs)
        predicted = [i for i in range(count) if i != bad]
        assert (summary.predicted, summary.skipped, summary.failed) == (count - 1, 1, 0)
        assert summary.not_reached == 0
    else:
        with pytest.raises(BadSampleError, match=f"{bad}.png") as caught:
            write_predictions(predictor, paths, out, **kwargs)
        summary, predicted = caught.value.summary, list(range(bad))
        assert (summary.predicted, summary.skipped, summary.failed) == (bad, 0, 1)
        assert summary.not_reached == count - bad - 1
        described = f"stopped there: {bad} predicted, 0 skipped, 1 failed"
        assert described in str(caught.value)
    content = json.load(open(out / "panoptic.json"))
    assert [image["file_name"] for image in content["images"]] == [f"{i}.png" for i in predicted]
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == [f"{i}.png" for i in predicted]


# ----------------------------------------------------------------------------- input contract


def test_an_image_in_each_accepted_form_gives_the_same_result(weights, image_dir):
    predictor = Predictor.from_checkpoint(weights, device="cpu")
    path = image_dir / "a.png"
    array = np.array(Image.open(path).convert("RGB"))
    forms = {
        "path": path,
        "str": str(path),
        "PIL": Image.open(path),
        "array": array,
        "read-only array": np.asarray(Image.open(path).convert("RGB")),
        "uint8 tensor": torch.from_numpy(array).permute(2, 0, 1).contiguous(),
        # The values uint8 images become (torchvision's scaling, which rounds x * (1/255),
        # where x / 255 differs in the last bit for about half the values).
        "float tensor": to_dtype(torch.from_numpy(array).permute(2, 0, 1), scale=True),
    }
    expected_seg, expected_segments = predictor(array, "panoptic")
    assert expected_segments, "a score threshold of 0 keeps segments"
    for form, image in forms.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # np.asarray(PIL image) is read-only: no warning
            seg, segments = predictor(image, "panoptic")
        assert torch.equal(seg, expected_seg) and segments == expected_segments, form
    # A uint8 tensor is scaled like the array, not read as 0-255 floats.
    tensor = as_image_tensor(forms["uint8 tensor"])
    assert tensor.dtype == torch.float32 and torch.equal(tensor, as_image_tensor(array))
    assert tensor.max() <= 1


@pytest.mark.parametrize(
    "image, what",
    [
        (torch.zeros(40, 56, 3, dtype=torch.uint8), r"a torch tensor of shape \(40, 56, 3\)"),
        (torch.rand(40, 56, 3), r"a torch tensor of shape \(40, 56, 3\)"),
        (torch.rand(1, 3, 40, 56), r"a torch tensor of shape \(1, 3, 40, 56\)"),
        (torch.zeros(3, 40, 56, dtype=torch.int32), "a torch torch.int32 tensor"),
        (torch.zeros(3, 40, 56, dtype=torch.bool), "a torch torch.bool tensor"),
        (np.zeros((40, 56), np.uint8), r"a numpy uint8 array \(40, 56\)"),  # grayscale
        (np.zeros((40, 56, 4), np.uint8), r"a numpy uint8 array \(40, 56, 4\)"),
        (np.zeros((40, 56, 3), np.float32), r"a numpy float32 array \(40, 56, 3\)"),
        ([[0, 1], [2, 3]], "a list"),
    ],
    ids=["hwc-uint8", "hwc-float", "batch", "int32", "bool", "gray", "rgba", "float-array", "list"],
)
def test_other_image_forms_are_refused_listing_the_accepted_ones(image, what):
    with pytest.raises(TypeError, match=f"cannot use {what} as an image; accepted: ") as caught:
        as_image_tensor(image)
    assert str(caught.value).endswith(ACCEPTED_IMAGES)


def test_a_float_tensor_outside_0_1_is_refused(weights):
    predictor = Predictor.from_checkpoint(weights, device="cpu")
    pixels = torch.full((3, 20, 30), 200.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got \[200, 200\]: divide .* by 255"):
        predictor(pixels, "semantic")
    with pytest.raises(ValueError, match=r"got \[nan, nan\]"):
        as_image_tensor(torch.full((3, 4, 4), float("nan")))


# ----------------------------------------------------------------------------- ids


def test_api_category_ids_are_those_of_the_json_files(weights, image_dir, tmp_path):
    predictor = Predictor.from_checkpoint(weights, device="cpu")
    path = image_dir / "a.png"
    _, segments = predictor(path, "panoptic")
    instances = predictor(path, "instance")
    assert segments and len(instances["scores"])
    for segment in segments:
        assert set(segment) == {"id", "label", "category_id", "isthing", "score"}
        assert segment["category_id"] == CATEGORIES[segment["label"]]["id"] != segment["label"]
        assert segment["isthing"] == CATEGORIES[segment["label"]]["isthing"]
    labels = instances["labels"].tolist()
    assert instances["category_ids"].tolist() == [CATEGORIES[label]["id"] for label in labels]

    write_predictions(predictor, [path], tmp_path / "pan", "panoptic", progress=False)
    write_predictions(predictor, [path], tmp_path / "ins", "instance", progress=False)
    (annotation,) = json.load(open(tmp_path / "pan" / "panoptic.json"))["annotations"]
    written = [(s["id"], s["category_id"]) for s in annotation["segments_info"]]
    assert written == [(s["id"], s["category_id"]) for s in segments]
    results = json.load(open(tmp_path / "ins" / "instances.json"))
    assert [r["category_id"] for r in results] == instances["category_ids"].tolist()
    # Scores keep their float32 value, hence the ranking COCOeval sees.
    assert [np.float32(r["score"]) for r in results] == instances["scores"].tolist()


def _coco_images(tmp_path, entries):
    (tmp_path / "gt.json").write_text(json.dumps({"images": entries, "categories": CATEGORIES}))
    return tmp_path / "gt.json"


def test_coco_json_gives_its_ids_and_file_names_a_missing_image_is_bad(
    weights, image_dir, tmp_path
):
    gt = _coco_images(
        tmp_path,
        [
            {"id": 9, "file_name": "b.jpg", "height": 48, "width": 48},
            {"id": 7, "file_name": "gone.jpg", "height": 10, "width": 10},
            {"id": 3, "file_name": "a.png", "height": 40, "width": 56},
        ],
    )
    out = tmp_path / "skip"
    with pytest.warns(BadSampleWarning, match="gone.jpg"):
        run(weights, image_dir, out, "--coco-json", str(gt), "--bad-images", "skip")
    content = json.load(open(out / "panoptic.json"))
    assert [(i["id"], i["file_name"]) for i in content["images"]] == [(9, "b.jpg"), (3, "a.png")]
    assert [(a["image_id"], a["file_name"]) for a in content["annotations"]] == [
        (9, "b.png"),
        (3, "a.png"),
    ]
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["a.png", "b.png"]
    assert "gone.jpg" in (out / "skipped_images.txt").read_text()

    with pytest.warns(BadSampleWarning, match="gone.jpg"):
        run(weights, image_dir, tmp_path / "ins", "--coco-json", str(gt), "--task", "instance",
            "--bad-images", "skip")  # fmt: skip
    assert {r["image_id"] for r in json.load(open(tmp_path / "ins" / "instances.json"))} == {9, 3}

    with pytest.raises(BadSampleError, match=r"not found: .*gone.jpg"):
        run(weights, image_dir, tmp_path / "stop", "--coco-json", str(gt), "--batch-size", "1")
    done = json.load(open(tmp_path / "stop" / "panoptic.json"))
    assert [image["id"] for image in done["images"]] == [9]


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"id": 1}], r"images\[0\] lacks 'id' or 'file_name'"),
        (
            [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.jpg"}],
            "image id 1 appears twice",
        ),
    ],
)
def test_coco_json_errors(weights, image_dir, tmp_path, entries, message):
    with pytest.raises(ValueError, match=message):
        run(
            weights,
            image_dir,
            tmp_path / "out",
            "--coco-json",
            str(_coco_images(tmp_path, entries)),
        )
    with pytest.raises(
        NotADirectoryError, match="a.png is not a folder; the images of .*gt.json are found"
    ):
        run(
            weights, image_dir / "a.png", tmp_path / "out", "--coco-json", str(tmp_path / "gt.json")
        )


def test_predict_then_evaluate_equals_the_trainers_evaluation(tiny_cfg, synthetic_root, tmp_path):
    """The files of tools/predict.py --coco-json, scored by tools/evaluate.py against the
    ground truth, give the numbers of the trainer's own evaluation of the same model."""
    cfg = tiny_cfg(
        "solver.max_iter=60",
        "checkpoint_period=60",
        "log_period=60",
        "test.metrics=[panoptic, instance]",
        "test.score_threshold=0.0",  # a barely trained model: keep its segments
        "test.overlap_threshold=0.0",
    )
    trained = Trainer(cfg).train()
    assert trained["panoptic"]["PQ"] > 0 and trained["instance"]["AP"] > 0
    val = synthetic_split_paths(synthetic_root, "val")
    weights = tmp_path / "run" / "model_0000060.pth"
    for task, gt_json in (("panoptic", val["panoptic_json"]), ("instance", val["instance_json"])):
        # The trainer's batch size: a batch's numbers may differ in the last bits from another's.
        run(weights, val["image_dir"], tmp_path / task, "--coco-json", str(gt_json),
            "--task", task, "--batch-size", str(cfg.test.batch_size), "--no-overlay",
            "--device", "cpu")  # fmt: skip
    panoptic_scores = panoptic.evaluate_files(
        val["panoptic_json"],
        val["panoptic_png_dir"],
        tmp_path / "panoptic" / "panoptic.json",
        tmp_path / "panoptic" / "panoptic",
        workers=0,
    )
    instance_scores, _ = instance.evaluate_files(
        val["instance_json"], tmp_path / "instance" / "instances.json"
    )
    assert {key: panoptic_scores["All"][key] for key in ("PQ", "SQ", "RQ")} == {
        key: trained["panoptic"][key] for key in ("PQ", "SQ", "RQ")
    }
    keys = COCO_STATS
    assert [instance_scores[key] for key in keys] == pytest.approx(
        [trained["instance"][key] for key in keys], rel=0, abs=0, nan_ok=True
    )


# ----------------------------------------------------------------------------- full disk


def _no_space(path=None):
    return OSError(errno.ENOSPC, "No space left on device", path)


def _json_leftovers(out):
    return sorted(p.name for p in out.iterdir() if ".json." in p.name)


def test_full_disk_at_a_png_keeps_the_images_before(weights, image_dir, tmp_path, monkeypatch):
    save = Image.Image.save

    def save_until_full(image, path, *args, **kwargs):
        if path.parent.name == "overlay" and path.stem == "b":  # after panoptic/b.png
            path.write_bytes(b"\x89PNG half")
            raise _no_space()
        save(image, path, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    out = tmp_path / "out"
    message = (
        r"\[Errno 28\] could not write .*overlay/b.png \(No space left on device\); "
        r".*panoptic.json holds the 1 images completed before it"
    )
    with pytest.raises(OSError, match=message) as caught:
        run(weights, image_dir, out, "--batch-size", "2")
    assert caught.value.errno == errno.ENOSPC
    content = json.load(open(out / "panoptic.json"))
    assert [i["file_name"] for i in content["images"]] == ["a.png"]
    assert [a["file_name"] for a in content["annotations"]] == ["a.png"]
    assert content["categories"] == CATEGORIES
    for folder in ("panoptic", "overlay"):  # b's files, complete or not, are removed
        assert sorted(p.name for p in (out / folder).iterdir()) == ["a.png"]
    assert _json_leftovers(out) == []


@pytest.mark.parametrize("task, failing", [
    ("panoptic", "panoptic.json.partial"),
    ("panoptic", "panoptic.json.images.part"),
    ("panoptic", "panoptic.json.reserve"),
    ("instance", "instances.json.partial"),
])  # fmt: skip
def test_full_disk_at_a_json_append_keeps_the_images_before(
    weights, image_dir, tmp_path, monkeypatch, task, failing
):
    """The entries of image b go in, half of one write lands, the disk is full: the JSON
    closes into image a's entries alone."""
    out = tmp_path / "out"
    write_all = streamed_json._write_all

    def write_until_full(file, data):
        writing_b = (out / "overlay" / "b.png").exists()
        if writing_b and file.name.endswith(failing) and len(data) > 1:
            file.write(data[: len(data) // 2])
            raise _no_space(file.name)
        write_all(file, data)

    monkeypatch.setattr(streamed_json, "_write_all", write_until_full)
    json_name = {"panoptic": "panoptic.json", "instance": "instances.json"}[task]
    message = rf"could not write .*{json_name} \(No space left on device\); .*{json_name} holds "
    with pytest.raises(OSError, match=message + "the 1 images completed before it"):
        run(weights, image_dir, out, "--task", task)
    content = json.load(open(out / json_name))
    if task == "panoptic":
        assert [i["id"] for i in content["images"]] == ["a"]
        assert [a["image_id"] for a in content["annotations"]] == ["a"]
        assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["a.png"]
    else:
        assert content and {r["image_id"] for r in content} == {"a"}
    assert sorted(p.name for p in (out / "overlay").iterdir()) == ["a.png"]
    assert _json_leftovers(out) == []


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--batch-size", "0", "1"), ("--batch-size", "x", "1"), ("--show-queries", "-1", "0")],
)
def test_count_arguments_are_checked(flag, value, expected, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--weights", "w", "--input", "i", "--output", "o", flag, value])
    error = capsys.readouterr().err
    assert f"argument {flag}: expected an integer >= {expected}, got '{value}'" in error


def test_write_predictions_checks_its_counts(weights, image_dir, tmp_path):
    predictor = Predictor.from_checkpoint(weights, device="cpu")
    with pytest.raises(ValueError, match="batch_size must be >= 1 and show_queries >= 0"):
        write_predictions(predictor, [image_dir / "a.png"], tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="got 4 and -2"):
        write_predictions(predictor, [image_dir / "a.png"], tmp_path, show_queries=-2)


# ----------------------------------------------------------------------------- user errors


def test_user_errors_are_one_line(weights, image_dir, tmp_path, capsys):
    """A user's mistake ends in one line `error: ...` naming the file or option, status 2."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    w = ["--weights", str(weights)]
    io = ["--input", str(image_dir), "--output", str(tmp_path / "out")]
    cases = {
        "weights": (["--weights", "gone.pth", *io], "error: checkpoint not found: gone.pth"),
        "no folder": (
            [*w, "--input", "gone/", "--output", "out"],
            "error: gone/: no such image or folder",
        ),
        "empty folder": (
            [*w, "--input", str(tmp_path / "empty"), "--output", "out"],
            rf"error: no images \(.*\) found at {tmp_path / 'empty'}",
        ),
        "task": ([*w, *io, "--task", "depth"], "error: argument --task: invalid choice: 'depth'"),
        "options": (
            [*w, *io, "--weights-dtype", "bf16", "--autocast", "bf16"],
            "error: --autocast: autocast bf16 with bf16 weights would recast them",
        ),
        "coco-json": (
            [*w, "--input", str(image_dir / "a.png"), "--output", "out", "--coco-json", "x.json"],
            "error: .*a.png is not a folder; the images of x.json are found in one",
        ),
        "output": (
            [*w, "--input", str(image_dir), "--output", str(tmp_path / "file" / "out")],
            rf"error: \[Errno 20\] Not a directory: '{tmp_path / 'file' / 'out'}'",
        ),
    }
    for case, (argv, message) in cases.items():
        with pytest.raises(SystemExit) as caught:
            run_tool(main, parse_args, argv)
        assert caught.value.code == 2, case
        (line,) = capsys.readouterr().err.splitlines()
        assert re.fullmatch(message + ".*", line), (case, line)


def test_a_read_only_output_is_one_line(weights, image_dir, tmp_path, capsys, read_only):
    read_only(tmp_path / "ro")
    argv = ["--weights", str(weights), "--input", str(image_dir), "--output", str(tmp_path / "ro")]
    with pytest.raises(SystemExit) as caught:
        run_tool(main, parse_args, [*argv, "--quiet"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"error: [Errno 13] Permission denied: '{tmp_path / 'ro'}'\n"


# ----------------------------------------------------------------------------- tiles


def test_an_image_no_larger_than_a_tile_gives_the_untiled_result(weights):
    untiled = Predictor.from_checkpoint(weights, device="cpu")
    tiled = Predictor.from_checkpoint(weights, device="cpu", tile=32, overlap=8)
    rng = np.random.default_rng(3)
    for size in ((30, 20), (32, 32), (12, 31)):  # the tiny model's input is 32 x 32
        image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        seg, segments = untiled(image, "panoptic")
        assert segments, "a score threshold of 0 keeps segments"
        tiled_seg, tiled_segments = tiled(image, "panoptic")
        assert torch.equal(tiled_seg, seg) and tiled_segments == segments
        assert torch.equal(tiled(image, "semantic"), untiled(image, "semantic"))
        # Instances: the same, each mask within its box, best score first, empty ones left out.
        expected = untiled(image, "instance")
        got = tiled(image, "instance")
        order = expected["scores"].argsort(descending=True, stable=True)
        order = order[expected["masks"][order].flatten(1).any(1)]
        assert torch.equal(got["scores"], expected["scores"][order])
        assert torch.equal(got["category_ids"], expected["category_ids"][order])
        for box, mask, full in zip(got["boxes"].tolist(), got["masks"], expected["masks"][order]):
            x0, y0, x1, y1 = box
            pasted = torch.zeros_like(full)
            pasted[y0:y1, x0:x1] = mask
            assert torch.equal(pasted, full)


def test_predict_tool_tiles_large_images(weights, image_dir, tmp_path, capsys):
    """a.png (40 x 56) and b.jpg (48 x 48) in tiles of 32 (the tiny model's input size)."""
    out = tmp_path / "out"
    run(weights, image_dir, out, "--tile", "32", "--tile-overlap", "8", "--batch-size", "3")
    assert capsys.readouterr().out.startswith("3 images: 3 predicted, 0 skipped, 0 failed")
    content = json.loads((out / "panoptic.json").read_text())
    for annotation, info in zip(content["annotations"], content["images"]):
        seg = read_panoptic_png(out / "panoptic" / annotation["file_name"])
        assert seg.shape == (info["height"], info["width"])  # full resolution
        segments = annotation["segments_info"]
        assert sorted(s["id"] for s in segments) == sorted(set(np.unique(seg).tolist()) - {0})
        for segment in segments:
            assert segment["area"] == int((seg == segment["id"]).sum())
    assert (out / "overlay" / "a.png").is_file()

    run(weights, image_dir / "a.png", tmp_path / "ins", "--task", "instance", "--tile", "32")
    results = json.loads((tmp_path / "ins" / "instances.json").read_text())
    assert results and {r["category_id"] for r in results} <= {c["id"] for c in CATEGORIES[:3]}
    predictor = Predictor.from_checkpoint(weights, device="cpu", tile=32, overlap=0.25)
    expected = predictor(image_dir / "a.png", "instance")
    assert len(results) == len(expected["scores"])
    for result, box, mask in zip(results, expected["boxes"].tolist(), expected["masks"]):
        decoded = mask_utils.decode(result["segmentation"])
        assert decoded.shape == (40, 56)
        x0, y0, x1, y1 = box
        assert decoded.sum() == decoded[y0:y1, x0:x1].sum() == int(mask.sum())
        assert np.array_equal(decoded[y0:y1, x0:x1], mask.numpy())
    assert (tmp_path / "ins" / "overlay" / "a.png").is_file()

    run(weights, image_dir / "a.png", tmp_path / "sem", "--task", "semantic", "--tile", "32")
    labels = np.asarray(Image.open(tmp_path / "sem" / "semantic" / "a.png"))
    assert labels.shape == (40, 56) and labels.max() < CLASSES


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tile-overlap", "8"], "error: --tile-overlap needs --tile"),
        (["--tile", "32", "--show-queries", "2"], "error: --show-queries draws the untiled"),
        (["--tile", "64"], "error: tile 64 must be in 1..32: the model's input is 32x32, and a"),
        (["--tile", "32", "--tile-overlap", "32"], r"error: overlap 32 must be in 0..31 pixels"),
        (["--tile", "32", "--tile-overlap", "x"], "error: argument --tile-overlap: expected pix"),
    ],
    ids=["overlap-alone", "queries", "too-large", "overlap", "not-a-number"],
)
def test_tile_option_errors_are_one_line(weights, image_dir, tmp_path, capsys, extra, message):
    argv = ["--weights", str(weights), "--input", str(image_dir), "--output", str(tmp_path)]
    with pytest.raises(SystemExit) as caught:
        run_tool(main, parse_args, [*argv, *extra])
    assert caught.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.match(message, line), line
