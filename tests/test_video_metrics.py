"""VIPSeg VPQ (eomt/evaluation/video_panoptic.py, `tools/evaluate.py vps`) and VSPW mIoU / video
consistency (eomt/evaluation/video_semantic.py, `tools/evaluate.py vss`) on tiny files whose
numbers are computed by hand. Their equality with the reference scripts on random files:
docs/video.md."""

import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from eomt.cli import run_tool
from eomt.evaluation import video_panoptic, video_semantic
from eomt.evaluation.panoptic_io import write_panoptic_png
from tools import evaluate

# -- VPQ --------------------------------------------------------------------------------------

PERSON, SKY = 1, 2  # a thing and a stuff category
CATEGORIES = [
    {"id": PERSON, "name": "person", "isthing": 1},
    {"id": SKY, "name": "sky", "isthing": 0},
]


def _frame(shape=(2, 4), **pixels) -> np.ndarray:
    """A segment-id map: pixels={id_name: [(row, col), ...]}, ids from the name's digits."""
    segment_map = np.zeros(shape, dtype=np.int64)
    for name, where in pixels.items():
        for row, col in where:
            segment_map[row, col] = int(name[1:])
    return segment_map


def _vps_files(tmp_path, gt_frames, pred_frames, categories=CATEGORIES, video="v1"):
    """One video: per frame (id map, {id: category or (category, iscrowd, area)}) on each side;
    a ground-truth area defaults to the id's pixels. Returns the tool's four file arguments."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pan_pred"
    (gt_dir / video).mkdir(parents=True, exist_ok=True)
    (pred_dir / video).mkdir(parents=True, exist_ok=True)
    images, gt_annotations, pred_annotations = [], [], []
    for index, ((gt_map, gt_segments), (pred_map, pred_segments)) in enumerate(
        zip(gt_frames, pred_frames)
    ):
        name = f"{index:05d}.png"
        images.append({"id": name[:-4], "file_name": name})
        write_panoptic_png(gt_dir / video / name, gt_map)
        write_panoptic_png(pred_dir / video / name, pred_map)
        segments = []
        for segment_id, info in gt_segments.items():
            category, crowd, area = info if isinstance(info, tuple) else (info, 0, None)
            if area is None:
                area = int((gt_map == segment_id).sum())
            segments.append(
                {"id": segment_id, "category_id": category, "iscrowd": crowd, "area": area}
            )
        gt_annotations.append({"image_id": name[:-4], "file_name": name, "segments_info": segments})
        pred_annotations.append(
            {"segments_info": [{"id": i, "category_id": c} for i, c in pred_segments.items()]}
        )
    gt = {
        "videos": [{"video_id": video, "images": images}],
        "annotations": [{"video_id": video, "annotations": gt_annotations}],
        "categories": categories,
    }
    pred = {"annotations": [{"video_id": video, "annotations": pred_annotations}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    return [
        *("--gt-json", str(tmp_path / "gt.json"), "--gt-dir", str(gt_dir)),
        *("--pred-json", str(tmp_path / "pred.json"), "--pred-dir", str(pred_dir)),
    ]


def _vpq(tmp_path, gt_frames, pred_frames, windows, categories=CATEGORIES) -> dict:
    args = _vps_files(tmp_path, gt_frames, pred_frames, categories)[1::2]
    loaded = video_panoptic.read_videos(*args)
    return video_panoptic.vpq(*loaded, windows=windows)


def test_vpq_perfect_prediction_with_absent_frames_is_100(tmp_path):
    # 8 frames: a person present in frames 0-2 and 5-7 only, sky everywhere else.
    frames = []
    for index in range(8):
        person = [(0, 0), (0, 1)] if index not in (3, 4) else []
        sky = [(r, c) for r in range(2) for c in range(4) if (r, c) not in person]
        segments = {7: PERSON, 9: SKY} if person else {9: SKY}
        frames.append((_frame(s7=person, s9=sky), segments))
    summary = video_panoptic.evaluate_files(*_vps_files(tmp_path, frames, frames)[1::2])
    assert summary["VPQ"] == summary["VPQ_thing"] == summary["VPQ_stuff"] == 100
    assert list(summary["windows"]) == ["0", "5", "15", "25", "35"]
    for window in summary["windows"].values():
        assert window["All"] == {"PQ": 100, "SQ": 100, "RQ": 100, "N": 2}
    # 8 windows of 1 frame: the person in 6; 7 of 2 frames, the person in 6 (not 3-4); 5 of 4
    # frames, the person in all 5.
    assert summary["windows"]["0"]["per_class"][str(PERSON)]["TP"] == 6
    assert summary["windows"]["5"]["per_class"][str(PERSON)]["TP"] == 6
    assert summary["windows"]["15"]["per_class"][str(PERSON)]["TP"] == 5
    assert summary["windows"]["35"]["per_class"][str(SKY)]["TP"] == 1


def test_vpq_of_a_track_that_switches_identity_halfway(tmp_path):
    # The person (2 pixels a frame, 4 frames) is predicted as id 21 in frames 0-1, id 22 in
    # frames 2-3. No stuff anywhere: the Stuff group counts no class and is NaN.
    person = [(0, 0), (0, 1)]
    gt = [(_frame(s7=person), {7: PERSON})] * 4
    pred = [(_frame(s21=person), {21: PERSON})] * 2 + [(_frame(s22=person), {22: PERSON})] * 2
    summary = _vpq(tmp_path, gt, pred, windows=(1, 2, 4))
    one, two, four = (summary["windows"][k] for k in ("0", "5", "15"))
    # 1 frame: 4 perfect matches.
    assert (one["per_class"][str(PERSON)]["TP"], one["per_class"][str(PERSON)]["IoU"]) == (4, 4)
    assert (one["Things"]["PQ"], one["Things"]["N"]) == (100, 1)
    # 2 frames: windows 0-1 and 2-3 match (IoU 1); in window 1-2 each id covers half of the
    # tube (IoU 2 / 4, not above 0.5): one FN and two FP. PQ = 2 / (2 + 1/2 + 2/2).
    row = two["per_class"][str(PERSON)]
    assert (row["TP"], row["FP"], row["FN"], row["IoU"]) == (2, 2, 1, 2.0)
    assert two["Things"]["PQ"] == 100 * (2 / 3.5)
    assert two["Things"]["SQ"] == 100 and two["Things"]["RQ"] == 100 * (2 / 3.5)
    # 4 frames: one window, IoU 1/2 with each id: 0.
    assert (four["per_class"][str(PERSON)]["FP"], four["Things"]["PQ"]) == (2, 0)
    assert math.isnan(two["Stuff"]["PQ"]) and two["Stuff"]["N"] == 0
    assert summary["VPQ"] == summary["VPQ_thing"] == (100 + 100 * (2 / 3.5) + 0) / 3
    assert math.isnan(summary["VPQ_stuff"])


def test_vpq_of_a_track_absent_in_some_frames_and_void(tmp_path):
    # The person is in frames 0-1 only (void after); the prediction runs on one pixel into
    # frame 2, on void: not a FP, and out of the tube's union (IoU 2 / (3 + 2 - 2 - 1) = 1).
    person = [(0, 0), (0, 1)]
    gt = [(_frame(s7=person), {7: PERSON})] * 2 + [(_frame(), {})] * 2
    pred = [(_frame(s21=person), {21: PERSON})] * 2
    pred += [(_frame(s21=[(0, 0)]), {21: PERSON}), (_frame(), {})]
    summary = _vpq(tmp_path, gt, pred, windows=(1, 2, 4))
    counts = [
        tuple(summary["windows"][k]["per_class"][str(PERSON)][key] for key in ("TP", "FP", "FN"))
        for k in ("0", "5", "15")
    ]
    assert counts == [(2, 0, 0), (2, 0, 0), (1, 0, 0)]
    assert summary["VPQ"] == 100
    # The same extra pixel on sky instead of void: a FP in frame 2, IoU 2 / 3 in window 1-2.
    sky = [(1, c) for c in range(4)]
    gt = [(_frame(s7=person, s9=sky), {7: PERSON, 9: SKY})] * 2 + [(_frame(s9=sky), {9: SKY})] * 2
    pred = [(_frame(s21=person, s29=sky), {21: PERSON, 29: SKY})] * 2
    pred += [(_frame(s21=[(1, 0)], s29=sky[1:]), {21: PERSON, 29: SKY})]
    pred += [(_frame(s29=sky), {29: SKY})]
    summary = _vpq(tmp_path, gt, pred, windows=(1, 2))
    one, two = summary["windows"]["0"], summary["windows"]["5"]
    assert one["per_class"][str(PERSON)]["FP"] == 1
    assert one["Things"]["PQ"] == 100 * (2 / 2.5)
    row = two["per_class"][str(PERSON)]
    assert (row["TP"], row["FP"], row["FN"]) == (2, 1, 0)  # window 2-3: a FP again
    assert row["IoU"] == 1 + 2 / 3
    # Sky: frame 2 has 3 of its 4 pixels predicted: IoU 3 / 4 alone, (4 + 3) / 8 with frame 1.
    assert one["per_class"][str(SKY)]["IoU"] == 3 + 3 / 4
    assert two["per_class"][str(SKY)]["IoU"] == 7 / 8 + 7 / 8 + 1


def test_vpq_of_an_empty_prediction_is_0_with_every_segment_a_fn(tmp_path):
    frames = [(_frame(s7=[(0, 0)], s9=[(1, 1)]), {7: PERSON, 9: SKY})] * 3
    empty = [(_frame(), {})] * 3
    summary = _vpq(tmp_path, frames, empty, windows=(1, 2))
    assert summary["VPQ"] == 0 and summary["windows"]["0"]["All"]["N"] == 2
    assert summary["windows"]["0"]["per_class"][str(SKY)]["FN"] == 3
    assert summary["windows"]["5"]["per_class"][str(PERSON)]["FN"] == 2


def test_vpq_crowd_and_the_json_area(tmp_path):
    # A crowd of people (pixels (1, 0-2)): a predicted person on it is no FP. The ground
    # truth's JSON area (here 3 for 2 pixels) counts, not its pixels: IoU 2 / 3.
    gt_map = _frame(s7=[(0, 0), (0, 1)], s8=[(1, 0), (1, 1), (1, 2)])
    gt = [(gt_map, {7: (PERSON, 0, 3), 8: (PERSON, 1, None)})]
    pred = [(_frame(s21=[(0, 0), (0, 1)], s22=[(1, 0), (1, 1)]), {21: PERSON, 22: PERSON})]
    row = _vpq(tmp_path, gt, pred, windows=(1,))["windows"]["0"]["per_class"][str(PERSON)]
    assert (row["TP"], row["FP"], row["FN"], row["IoU"]) == (1, 0, 0, 2 / 3)


def test_vpq_duplicate_ids_in_a_frame_are_one_segment(tmp_path):
    # vps_eval lists a stuff category's segments under one id, once per segment.
    gt = [(_frame(s9=[(0, 0), (1, 3)]), {9: SKY})]
    pred = [(_frame(s29=[(0, 0), (1, 3)]), {29: SKY})]
    args = _vps_files(tmp_path, gt, pred)
    prediction = json.loads((tmp_path / "pred.json").read_text())
    segments = prediction["annotations"][0]["annotations"][0]["segments_info"]
    segments.append(dict(segments[0]))
    (tmp_path / "pred.json").write_text(json.dumps(prediction))
    summary = video_panoptic.vpq(*video_panoptic.read_videos(*args[1::2]), windows=(1,))
    assert summary["windows"]["0"]["per_class"][str(SKY)]["TP"] == 1


def test_vps_tool_json_and_table(tmp_path, capsys):
    person = [(0, 0), (0, 1)]
    frames = [(_frame(s7=person), {7: PERSON})] * 8
    args = _vps_files(tmp_path, frames, frames)
    evaluate.main(["vps", *args, "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["VPQ"] == 100 and summary["VPQ_stuff"] is None  # no stuff: NaN -> null
    assert summary["windows"]["35"]["frames"] == 8
    evaluate.main(["vps", *args])
    table = capsys.readouterr().out
    assert "VPQ 100.00  VPQ_thing 100.00  VPQ_stuff nan" in table
    assert re.search(r"^ 35      8 \| 100\.00", table, re.M)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, file, message",
    [
        (
            lambda p, g: p["annotations"][0]["annotations"][0]["segments_info"].clear(),
            "pred.json",
            r"video v1 frame 0: .*00000.png has segment ids \[21\] missing from its segments_info",
        ),
        (
            lambda p, g: p["annotations"][0]["annotations"][1]["segments_info"].append(
                {"id": 5, "category_id": PERSON}
            ),
            "pred.json",
            r"video v1 frame 1: segments_info lists ids \[5\] that cover no pixel",
        ),
        (
            lambda p, g: p["annotations"][0]["annotations"][0]["segments_info"][0].update(
                category_id=77
            ),
            "pred.json",
            "video v1 frame 0: predicted segment 21 has unknown category_id 77",
        ),
        (
            lambda p, g: p["annotations"][0].update(video_id="v2"),
            "pred.json",
            "no prediction for video v1",
        ),
        (
            lambda p, g: p["annotations"][0]["annotations"].pop(),
            "pred.json",
            "video v1 has 1 frames, the ground truth 2",
        ),
        (
            lambda p, g: p["annotations"][0]["annotations"][0]["segments_info"][0].pop("id"),
            "pred.json",
            r"video v1 frame 0: prediction: segments_info\[0\] lacks the key\(s\) \['id'\]",
        ),
        (
            lambda p, g: g["categories"][0].pop("isthing"),
            "gt.json",
            r"categories\[0\] lacks the key\(s\) \['isthing'\]",
        ),
    ],
    ids=["unlisted", "absent", "category", "video", "frames", "key", "gt-category"],
)
def test_vps_bad_input_is_one_error_line_naming_file_and_field(
    tmp_path, capsys, edit, file, message
):
    person = [(0, 0), (0, 1)]
    args = _vps_files(
        tmp_path,
        [(_frame(s7=person), {7: PERSON})] * 2,
        [(_frame(s21=person), {21: PERSON})] * 2,
    )
    prediction = json.loads((tmp_path / "pred.json").read_text())
    truth = json.loads((tmp_path / "gt.json").read_text())
    edit(prediction, truth)
    (tmp_path / "pred.json").write_text(json.dumps(prediction))
    (tmp_path / "gt.json").write_text(json.dumps(truth))
    with pytest.raises(SystemExit) as stopped:
        run_tool(evaluate.main, None, ["vps", *args])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / file}: "), err
    assert re.search(message, err), err


def test_vps_missing_png_and_folder(tmp_path):
    frames = [(_frame(s7=[(0, 0)]), {7: PERSON})] * 2
    args = _vps_files(tmp_path, frames, frames)
    (tmp_path / "pan_pred" / "v1" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"panoptic PNG not found: .*v1/00001.png"):
        evaluate.main(["vps", *args])
    with pytest.raises(FileNotFoundError, match="folder not found: .*nowhere"):
        evaluate.main(["vps", *args[:6], "--pred-dir", str(tmp_path / "nowhere")])


# -- VSPW mIoU and VC -------------------------------------------------------------------------


def _vss_files(tmp_path, videos: dict) -> list[str]:
    """videos: {name: [(ground-truth values, predicted classes) per frame]} -> tool args."""
    for video, frames in videos.items():
        (tmp_path / "data" / video / "mask").mkdir(parents=True)
        (tmp_path / "pred" / video).mkdir(parents=True)
        for index, (gt, pred) in enumerate(frames):
            name = f"{index:08d}.png"
            Image.fromarray(np.array(gt, np.uint8)).save(tmp_path / "data" / video / "mask" / name)
            Image.fromarray(np.array(pred, np.uint8)).save(tmp_path / "pred" / video / name)
    (tmp_path / "val.txt").write_text("".join(f"{video}\n" for video in videos))
    return ["--gt-dir", str(tmp_path), "--pred-dir", str(tmp_path / "pred")]


def test_miou_with_ignored_pixels_and_a_class_only_predicted(tmp_path):
    # Ground truth value v is class v - 1; 0 and 255 (and 125+) are ignored. Frame pixels:
    #   gt   1 1 2 0 | 255 2 130      pred 0 0 0 5 | 5 1 9
    # counted: (0,0) (0,0) (1,0) | (1,1): class 0: TP 2, FP 1, IoU 2/3; class 1: TP 1, FN 1,
    # IoU 1/2; class 5 and 9 only predicted on ignored pixels: nowhere.
    gt = [[1, 1, 2, 0, 255, 2, 130]]
    pred = [[0, 0, 0, 5, 5, 1, 9]]
    summary = video_semantic.evaluate_files(*_vss_files(tmp_path, {"a": [(gt, pred)]})[1::2])
    assert summary["mIoU"] == 100 * ((2 / 3 + 1 / 2) / 2)
    assert summary["pACC"] == 100 * 3 / 4
    assert summary["mACC"] == 100 * (1 + 1 / 2) / 2
    assert summary["fwIoU"] == pytest.approx(100 * (2 / 4 * 2 / 3 + 2 / 4 * 1 / 2))
    assert summary["per_class"][0] == {"id": 0, "IoU": 100 * (2 / 3), "ACC": 100.0}
    assert math.isnan(summary["per_class"][5]["IoU"])
    # No window: every VC is NaN.
    assert all(math.isnan(summary[key]) for key in ("VC8", "VC16", "VC16_alone"))


def test_video_consistency_windows(tmp_path):
    # 10 frames of 4 pixels: the script's windows of 8 start at 0 and 1 (not 2, the last).
    # Ground truth pixel 3 changes at frame 4: out of both windows. Predicted pixel 0 changes
    # at frame 5 (in both windows), pixel 1 at frame 9 (in none): 2 of 3 kept in both.
    # A second video of 9 frames has one window (start 0), kept everywhere: 4 of 4.
    frames = []
    for index in range(10):
        gt = [[1, 1, 1, 1 if index < 4 else 2]]
        pred = [[0 if index < 5 else 3, 0 if index < 9 else 3, 0, 0]]
        frames.append((gt, pred))
    steady = [([[1, 1, 1, 1]], [[0, 0, 0, 0]])] * 9
    summary = video_semantic.evaluate_files(*_vss_files(tmp_path, {"a": frames, "b": steady})[1::2])
    assert summary["windows"] == {"8": 3, "16": 0}
    assert summary["VC8"] == 100 * np.mean([2 / 3, 2 / 3, 1.0])  # windows, not videos
    # No 16-frame window: the script's VC16 (its list not reset) is VC8's.
    assert summary["VC16"] == summary["VC8"] and math.isnan(summary["VC16_alone"])


def test_video_consistency_counts_ignored_values_and_skips_empty_windows(tmp_path):
    # Ground truth ignored (0) but steady on pixel 0, so VC counts it; pixel 1 alternates
    # between 1 and 2 in video a: no pixel of a window is kept there... except pixel 0.
    # Video b's ground truth changes on every pixel at every frame: its window is NaN, left out.
    a = [([[0, 1 + index % 2]], [[7, 0]]) for index in range(9)]
    b = [([[1 + index % 2, 1 + index % 2]], [[0, 0]]) for index in range(9)]
    summary = video_semantic.evaluate_files(*_vss_files(tmp_path, {"a": a, "b": b})[1::2])
    assert summary["windows"]["8"] == 2 and summary["VC8"] == 100


def test_vss_tool_json_and_errors(tmp_path, capsys):
    args = _vss_files(tmp_path, {"a": [([[1, 2]], [[0, 1]])] * 2})
    evaluate.main(["vss", *args, "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["mIoU"] == 100 and summary["VC8"] is None
    evaluate.main(["vss", *args])
    assert "mIoU 100.00  fwIoU 100.00" in capsys.readouterr().out

    Image.fromarray(np.array([[0, 124]], np.uint8)).save(tmp_path / "pred" / "a" / "00000001.png")
    with pytest.raises(SystemExit):
        run_tool(evaluate.main, None, ["vss", *args])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.search(
        r"^error: .*pred/a: 00000001.png: predicted class 124 .* outside 0 \.\. 123", err
    )

    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "pred" / "a" / "00000001.png")
    with pytest.raises(ValueError, match=r"00000001.png: prediction size \(2, 2\), ground truth"):
        evaluate.main(["vss", *args])
    (tmp_path / "pred" / "a" / "00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no prediction .*pred/a/00000001.png for"):
        evaluate.main(["vss", *args])
    Image.fromarray(np.array([[0, 1]], np.uint8)).save(tmp_path / "pred" / "a" / "00000001.png")
    (tmp_path / "val.txt").write_text("a\nb\n")
    with pytest.raises(FileNotFoundError, match=r"no ground-truth folder .*data/b/mask"):
        evaluate.main(["vss", *args, "--split", str(tmp_path / "val.txt")])
    with pytest.raises(FileNotFoundError, match="split file not found: .*test.txt"):
        evaluate.main(["vss", *args, "--split", str(tmp_path / "test.txt")])
    with pytest.raises(ValueError, match="--num-classes must be at least 1, not 0"):
        evaluate.main(["vss", *args, "--num-classes", "0"])
