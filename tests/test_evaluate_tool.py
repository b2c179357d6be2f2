import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from eomt.evaluation import PanopticEvaluator
from eomt.evaluation.files import json_ready
from eomt.evaluation.panoptic import FILES_PER_TASK
from eomt.evaluation.panoptic_io import write_panoptic_png
from eomt.tasks import panoptic
from tools import benchmark_eval, evaluate

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 17, "name": "sky", "isthing": 0},
    {"id": 30, "name": "grass", "isthing": 0},
    {"id": 18, "name": "dog", "isthing": 1},  # never present
]
PERSON, CAR, SKY, GRASS = 1, 3, 17, 30


def _image(height, width, regions):
    """Segment-id map from (rows, cols, id) regions painted in order."""
    segment_map = np.zeros((height, width), dtype=np.int64)
    for rows, cols, segment_id in regions:
        segment_map[rows, cols] = segment_id
    return segment_map


# (image id, ground truth map, its segments (id, category, iscrowd), prediction map, its
# segments (id, category)). Large ids like those of COCO's PNGs on the ground-truth side.
FIXTURE = [
    (
        11,  # void row 4: the sky prediction over it still has IoU 40 / 40
        _image(10, 10, [(slice(0, 4), slice(None), 1000), (slice(5, 10), slice(0, 5), 70000),
                        (slice(5, 10), slice(5, 10), 123456)]),
        [(1000, SKY, 0), (70000, PERSON, 0), (123456, CAR, 0)],
        _image(10, 10, [(slice(0, 5), slice(None), 5), (slice(5, 10), slice(0, 7), 6),
                        (slice(5, 10), slice(7, 10), 7)]),
        [(5, SKY), (6, PERSON), (7, CAR)],
    ),
    (
        12,  # a person crowd: a person on it is ignored, a car on it is a FP
        _image(8, 10, [(slice(0, 4), slice(None), 300), (slice(4, 8), slice(0, 5), 301),
                       (slice(4, 8), slice(5, 10), 302)]),
        [(300, PERSON, 1), (301, PERSON, 0), (302, GRASS, 0)],
        _image(8, 10, [(slice(0, 3), slice(None), 1), (slice(3, 8), slice(0, 5), 2),
                       (slice(3, 4), slice(5, 10), 3), (slice(4, 8), slice(5, 10), 4)]),
        [(1, PERSON), (2, PERSON), (3, CAR), (4, GRASS)],
    ),
    # All void: a prediction on it is ignored, and an empty prediction counts nothing.
    (13, _image(6, 6, []), [], _image(6, 6, [(slice(None), slice(None), 9)]), [(9, SKY)]),
    (14, _image(6, 6, []), [], _image(6, 6, []), []),
    (
        15,  # nothing predicted; person 41 is listed without pixels: a FN for pq_compute
        _image(6, 6, [(slice(None), slice(None), 40)]),
        [(40, SKY, 0), (41, PERSON, 0)],
        _image(6, 6, []),
        [],
    ),
    (
        16,  # car IoU exactly 0.5: no match
        _image(4, 8, [(slice(None), slice(0, 4), 50), (slice(None), slice(4, 8), 51)]),
        [(50, CAR, 0), (51, GRASS, 0)],
        _image(4, 8, [(slice(0, 2), slice(0, 4), 1), (slice(2, 4), slice(0, 4), 2),
                      (slice(None), slice(4, 8), 2)]),
        [(1, CAR), (2, GRASS)],
    ),
]  # fmt: skip

# PQ, SQ, RQ, N of pq_compute (cocodataset/panopticapi at commit 7bb4655, run with 1, 2 and 6
# processes: the same digits) on FIXTURE as written by write_panoptic_fixture; its fractions
# times 100.
OFFICIAL = {
    "All": (58.64285714285713, 79.76190476190477, 71.66666666666667, 4),
    "Things": (42.285714285714285, 67.85714285714286, 60.00000000000001, 2),
    "Stuff": (75.0, 91.66666666666666, 83.33333333333333, 2),
}


def write_panoptic_fixture(root):
    """FIXTURE as COCO panoptic ground truth and predictions under root."""
    (root / "gt").mkdir(parents=True)
    (root / "pred").mkdir()
    gt_annotations, pred_annotations = [], []
    for image_id, gt, gt_segments, pred, pred_segments in FIXTURE:
        file_name = f"{image_id:012d}.png"
        write_panoptic_png(root / "gt" / file_name, gt)
        write_panoptic_png(root / "pred" / file_name, pred)
        gt_annotations.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "segments_info": [
                    {"id": i, "category_id": c, "iscrowd": crowd, "area": int((gt == i).sum())}
                    for i, c, crowd in gt_segments
                ],
            }
        )
        pred_annotations.append(
            {
                "image_id": image_id,
                "file_name": file_name,
                "segments_info": [{"id": i, "category_id": c} for i, c in pred_segments],
            }
        )
    for name, content in (
        ("gt.json", {"annotations": gt_annotations, "categories": CATEGORIES}),
        ("pred.json", {"annotations": pred_annotations}),
    ):
        with open(root / name, "w") as file:
            json.dump(content, file)
    return root


def _panoptic_args(root, *extra):
    return [
        "panoptic",
        *("--gt-json", str(root / "gt.json"), "--gt-dir", str(root / "gt")),
        *("--pred-json", str(root / "pred.json"), "--pred-dir", str(root / "pred")),
        *extra,
    ]


def _edit_json(path, edit):
    with open(path) as file:
        content = json.load(file)
    edit(content)
    with open(path, "w") as file:
        json.dump(content, file)


# ----------------------------------------------------------------------------- panoptic


def test_scoring_files_imports_neither_torch_nor_timm(tmp_path):
    """tools/evaluate.py starts in half a second: torch, timm and torchvision take seconds;
    panoptic files do not wait for pycocotools either (instance files need it)."""
    root = write_panoptic_fixture(tmp_path)
    code = (
        "import sys; from tools import evaluate; "
        f"summary = evaluate.main({_panoptic_args(root, '--json', '--workers', '0')!r}); "
        "print(sorted({'torch', 'timm', 'torchvision', 'pycocotools'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out.splitlines()[0])["All"]["PQ"] == OFFICIAL["All"][0]
    assert out.splitlines()[-1] == "[]"


def test_panoptic_equals_official_pq_compute_and_hand_counts(tmp_path, capsys):
    root = write_panoptic_fixture(tmp_path)
    evaluate.main(_panoptic_args(root, "--json", "--workers", "0"))
    summary = json.loads(capsys.readouterr().out)
    for group, (pq, sq, rq, n) in OFFICIAL.items():
        assert summary[group] == {"PQ": pq, "SQ": sq, "RQ": rq, "N": n}, group

    counts = {cid: (row["TP"], row["FP"], row["FN"]) for cid, row in summary["per_class"].items()}
    assert counts == {
        "1": (2, 0, 1),
        "3": (1, 2, 1),
        "17": (1, 0, 1),
        "30": (2, 0, 0),
        "18": (0, 0, 0),
    }
    person = summary["per_class"]["1"]
    # IoUs 25/35 (image 11) and 20/25 (image 12, the crowd pixels of the prediction count).
    assert person["SQ"] == pytest.approx(100 * (25 / 35 + 0.8) / 2)
    assert person["PQ"] == pytest.approx(100 * (25 / 35 + 0.8) / 2.5)

    # Worker processes give the same numbers, and the table prints them.
    evaluate.main(_panoptic_args(root, "--workers", "2"))
    table = capsys.readouterr().out.splitlines()
    assert table[2].split() == ["All", "|", "58.6", "79.8", "71.7", "4"]
    assert table[8].split() == ["3", "car", "thing", "24.0", "60.0", "40.0", "1", "2", "1"]


def test_panoptic_tool_reads_what_the_evaluator_writes(tmp_path, capsys):
    root = write_panoptic_fixture(tmp_path)
    label_of = {category["id"]: label for label, category in enumerate(CATEGORIES)}
    writer = PanopticEvaluator(CATEGORIES, workers=1, output_dir=tmp_path / "out")
    for image_id, gt, gt_segments, pred, pred_segments in FIXTURE:
        gt_segments = [
            {"id": i, "category_id": label_of[c], "iscrowd": crowd} for i, c, crowd in gt_segments
        ]
        pred_segments = [{"id": i, "category_id": label_of[c]} for i, c in pred_segments]
        writer.process(
            pred, pred_segments, gt, gt_segments, image_id=image_id, file_name=f"{image_id}.jpg"
        )
    in_memory = writer.evaluate()
    evaluate.main(
        [
            "panoptic",
            *("--gt-json", str(root / "gt.json"), "--gt-dir", str(root / "gt")),
            *("--pred-json", str(tmp_path / "out" / "predictions.json")),
            *("--pred-dir", str(tmp_path / "out" / "predictions"), "--json"),
        ]
    )
    from_files = json.loads(capsys.readouterr().out)
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        expected = [in_memory[key + suffix] for key in ("PQ", "SQ", "RQ", "N")]
        assert [from_files[group][key] for key in ("PQ", "SQ", "RQ", "N")] == expected
        assert expected == list(OFFICIAL[group])
    for row in in_memory["per_class"]:
        assert from_files["per_class"][str(row.pop("id"))] == row


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda root: _edit_json(root / "pred.json", lambda d: d["annotations"].pop(2)),
            r"pred.json: no prediction for image id 13 \(000000000013.png",
        ),
        (
            lambda root: write_panoptic_png(root / "pred" / "000000000014.png", np.zeros((5, 6))),
            r"image 14 .*000000000014.png has size \(5, 6\) but .*gt/000000000014.png has \(6, 6\)",
        ),
        (
            lambda root: _edit_json(
                root / "pred.json",
                lambda d: d["annotations"][0]["segments_info"][0].update(category_id=99),
            ),
            "pred.json: image 11: segment 5 has unknown category_id 99",
        ),
        (
            lambda root: _edit_json(
                root / "pred.json", lambda d: d["annotations"][1]["segments_info"].pop(2)
            ),
            r"image 12 .*: predicted map has segment ids \[3\] that are missing from its segment",
        ),
        (
            lambda root: _edit_json(
                root / "pred.json",
                lambda d: d["annotations"][3]["segments_info"].append({"id": 8, "category_id": 1}),
            ),
            r"image 14 .*: predicted segment list has ids \[8\] that cover no pixel",
        ),
        (
            lambda root: (root / "pred" / "000000000016.png").unlink(),
            "panoptic PNG not found: .*000000000016.png",
        ),
        (
            lambda root: _edit_json(root / "gt.json", lambda d: d.pop("categories")),
            r"gt.json lacks the key\(s\) \['categories'\]",
        ),
    ],
    ids=["missing", "size", "category", "png-only", "json-only", "no-png", "gt-keys"],
)
def test_panoptic_errors_name_the_file_and_problem(tmp_path, break_it, message):
    root = write_panoptic_fixture(tmp_path)
    break_it(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        evaluate.main(_panoptic_args(root, "--workers", "1"))


STEM_NAMED = (
    r"{pred}: its image ids \(e.g. '{example}'\) match none of {gt}: the predictions are "
    r"named by file stem; run tools/predict.py with --coco-json {gt} to give them the ground "
    r"truth's image ids"
)


def _stem_named(pred, example, gt):
    return STEM_NAMED.format(pred=re.escape(str(pred)), example=example, gt=re.escape(str(gt)))


def test_panoptic_predictions_named_by_file_stem_say_how_to_predict(tmp_path):
    root = write_panoptic_fixture(tmp_path)

    def by_stem(content):
        for annotation in content["annotations"]:
            annotation["image_id"] = annotation["file_name"][: -len(".png")]

    _edit_json(root / "pred.json", by_stem)
    message = _stem_named(root / "pred.json", "000000000011", root / "gt.json")
    with pytest.raises(ValueError, match=message):
        evaluate.main(_panoptic_args(root, "--workers", "0"))


def test_benchmark_files_score_as_their_pairs_in_memory(tmp_path, capsys):
    """tools/benchmark_eval.py --files: COCO panoptic files (ground-truth ids random colours)
    whose PQ from files is that of the same pairs in memory, then timed."""
    rng = np.random.default_rng(0)
    pairs = [benchmark_eval.synthetic_pair(rng, 48, 64, 5, 6) for _ in range(2)]
    benchmark_eval.write_panoptic_files(tmp_path, pairs, 3, seed=0)
    from_files = panoptic.evaluate_files(
        tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred", 0
    )
    in_memory = PanopticEvaluator(benchmark_eval.coco_like_categories(), workers=0)
    for index in range(3):
        pred, pred_segments, gt, gt_segments = pairs[index % 2]
        present = [segment for segment in gt_segments if (gt == segment["id"]).any()]
        in_memory.process(pred, pred_segments, gt, present)  # COCO lists no empty segment
    expected = in_memory.evaluate()
    assert from_files["All"]["PQ"] == pytest.approx(expected["PQ"], rel=1e-12)
    for row in expected["per_class"]:
        counts = from_files["per_class"][str(row["id"])]
        assert [counts[key] for key in ("TP", "FP", "FN")] == [row["TP"], row["FP"], row["FN"]]

    benchmark_eval.main(["--files", str(tmp_path), "--workers", "0", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"PQ from the COCO panoptic files of 3 images in {tmp_path}"
    assert lines[2].split()[0] == "0"
    assert float(lines[2].split()[-1]) == pytest.approx(expected["PQ"], abs=1e-4)


def test_panoptic_files_in_tasks_of_several_images_give_the_same_numbers(tmp_path):
    """Workers read FILES_PER_TASK images a task; the sums are added in image order, so any
    number of workers gives every number of the single-process run."""
    rng = np.random.default_rng(1)
    pairs = [benchmark_eval.synthetic_pair(rng, 24, 32, 4, 5) for _ in range(3)]
    benchmark_eval.write_panoptic_files(tmp_path, pairs, 2 * FILES_PER_TASK + 3, seed=1)
    args = (tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json", tmp_path / "pred")
    assert panoptic.evaluate_files(*args, 2) == panoptic.evaluate_files(*args, 0)


# ----------------------------------------------------------------------------- semantic


def _write_labels(path, labels):
    Image.fromarray(np.asarray(labels, dtype=np.uint8)).save(path)


def test_semantic_folders_with_offset_and_ignore(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    # ADE20K encoding: PNG value v is class v - 1, 0 is ignored.
    _write_labels(tmp_path / "gt" / "a.png", [[1, 1, 2, 2], [1, 0, 2, 2]])
    _write_labels(tmp_path / "pred" / "a.png", [[1, 2, 2, 2], [3, 1, 3, 2]])
    _write_labels(tmp_path / "gt" / "b.png", [[3, 3]])
    _write_labels(tmp_path / "pred" / "b.png", [[3, 1]])
    (tmp_path / "pred" / "unmatched.png").touch()  # predictions without ground truth are unread
    (tmp_path / "names.txt").write_text("wall\nfloor\nsky\n")
    args = ["semantic", "--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "pred")]
    args += ["--num-classes", "3", "--label-offset", "1", "--ignore-index", "0"]
    args += ["--class-names", str(tmp_path / "names.txt"), "--output-dir", str(tmp_path / "out")]
    evaluate.main([*args, "--json"])
    summary = json.loads(capsys.readouterr().out)
    # Confusion (rows gt, cols pred): wall [1, 1, 1], floor [0, 3, 1], sky [1, 0, 1].
    # IoU wall 1 / (3 + 2 - 1), floor 3 / (4 + 4 - 3), sky 1 / (2 + 3 - 1).
    ious = [1 / 4, 3 / 5, 1 / 4]
    assert [row["name"] for row in summary["per_class"]] == ["wall", "floor", "sky"]
    assert [row["IoU"] for row in summary["per_class"]] == pytest.approx([100 * i for i in ious])
    assert summary["mIoU"] == pytest.approx(100 * sum(ious) / 3)
    assert summary["pACC"] == pytest.approx(100 * 5 / 9)
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "confusion_matrix.npy"), [[1, 1, 1], [0, 3, 1], [1, 0, 1]]
    )
    evaluate.main(args)
    assert capsys.readouterr().out.splitlines()[-1].startswith("mIoU 36.67  fwIoU")


def test_semantic_absent_class_is_null_in_json(tmp_path, capsys):
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
        _write_labels(tmp_path / folder / "x.png", [[0, 1]])
    args = ["semantic", "--gt-dir", str(tmp_path / "gt"), "--pred-dir", str(tmp_path / "pred")]
    evaluate.main([*args, "--num-classes", "3", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["per_class"][2] == {"name": "2", "IoU": None, "ACC": None}
    assert summary["mIoU"] == 100.0


@pytest.mark.parametrize(
    "pred, extra, message",
    [
        (None, [], r"no prediction .*pred/x.png for .*gt/x.png"),
        ([[0, 1, 1]], [], r"pred/x.png has size \(1, 3\) but .*gt/x.png has \(1, 2\)"),
        ([[0, 7]], [], r"pred/x.png: pred_labels must be in \[0, 3\), found values in \[-1, 0\]"),
        ([[0, 1]], ["--class-names", "names.txt"], "names.txt: 2 class names for --num-classes 3"),
    ],
    ids=["missing", "size", "out-of-range", "names"],
)
def test_semantic_errors_name_the_file(tmp_path, monkeypatch, pred, extra, message):
    monkeypatch.chdir(tmp_path)
    for folder in ("gt", "pred"):
        (tmp_path / folder).mkdir()
    _write_labels(tmp_path / "gt" / "x.png", [[0, 1]])
    if pred is not None:
        _write_labels(tmp_path / "pred" / "x.png", pred)
    (tmp_path / "names.txt").write_text("a\nb\n")
    args = ["semantic", "--gt-dir", "gt", "--pred-dir", "pred", "--num-classes", "3", *extra]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        evaluate.main(args)


# ----------------------------------------------------------------------------- instance


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _write_instance_files(root, results):
    person = np.zeros((16, 16), dtype=bool)
    person[:5, :5] = True  # 25 pixels
    annotation = {"id": 1, "image_id": 7, "category_id": 1, "segmentation": _rle(person)}
    annotation.update(area=25.0, bbox=[0, 0, 5, 5], iscrowd=0)
    ground_truth = {
        "images": [{"id": 7, "height": 16, "width": 16}],
        "annotations": [annotation],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    with open(root / "gt.json", "w") as file:
        json.dump(ground_truth, file)
    with open(root / "results.json", "w") as file:
        json.dump(results, file)
    args = ["instance", "--gt-json", str(root / "gt.json")]
    return [*args, "--pred-json", str(root / "results.json")]


def test_instance_results_file(tmp_path, capsys):
    inside = np.zeros((16, 16), dtype=bool)
    inside[:4, :4] = True  # IoU 16 / 25 with the person: a hit up to IoU threshold 0.60
    far = np.zeros((16, 16), dtype=bool)
    far[10:, 10:] = True
    results = [
        {"image_id": 7, "category_id": 1, "segmentation": _rle(inside), "score": 0.9},
        # Its box (10 x 10 = 100 pixels) would make it a medium detection; the mask says small.
        {"image_id": 7, "category_id": 1, "segmentation": _rle(far), "score": 0.2},
    ]
    results[1]["bbox"] = [0, 0, 10, 10]
    args = _write_instance_files(tmp_path, results)
    evaluate.main([*args, "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["AP"], summary["AP50"], summary["AP75"]) == pytest.approx((30.0, 100.0, 0.0))
    assert summary["APs"] == pytest.approx(30.0)
    assert summary["APm"] is None and summary["per_class"]["3"] == {"name": "car", "AP": None}
    assert len(summary) == 13  # the 12 COCO numbers and per_class
    evaluate.main(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")
    assert lines[0].endswith("= 0.300")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(image_id=8), "result 0: image_id 8 is not in the ground truth"),
        (lambda r: r.update(category_id=2), "result 0: unknown category_id 2"),
        (lambda r: r.pop("score"), r"result 0 lacks the key\(s\) \['score'\]"),
        (
            lambda r: r.update(segmentation=_rle(np.zeros((8, 16)))),
            r"result 0: mask size \[8, 16\] differs from image 7's \[16, 16\]",
        ),
        (lambda r: r.update(segmentation=[[0, 0, 1, 1]]), "result 0: segmentation must be an RLE"),
    ],
    ids=["image", "category", "score", "size", "polygon"],
)
def test_instance_errors_name_the_file(tmp_path, edit, message):
    result = {"image_id": 7, "category_id": 1, "segmentation": _rle(np.ones((16, 16))), "score": 1}
    edit(result)
    args = _write_instance_files(tmp_path, [result])
    with pytest.raises(ValueError, match="results.json: " + message):
        evaluate.main(args)


def test_instance_results_named_by_file_stem_say_how_to_predict(tmp_path):
    result = {"image_id": "photo", "category_id": 1, "score": 1}
    result["segmentation"] = _rle(np.ones((16, 16)))
    args = _write_instance_files(tmp_path, [result])
    message = _stem_named(tmp_path / "results.json", "photo", tmp_path / "gt.json")
    with pytest.raises(ValueError, match=message):
        evaluate.main(args)


def test_json_output_has_no_nan():
    assert json_ready({"a": [math.nan, 1.0], "b": {"c": math.nan}}) == {
        "a": [None, 1.0],
        "b": {"c": None},
    }
