"""YouTube-VIS evaluation (eomt/evaluation/video_instance.py, `tools/evaluate.py vis`) on tiny
files whose AP, AR and IoU are computed by hand. Its equality with ytvis_api on random files:
docs/video.md."""

import json
import re

import numpy as np
import pytest
from pycocotools import mask as mask_util

from eomt.cli import run_tool
from eomt.evaluation.video_instance import VIS_STATS, evaluate_files, track_iou
from tools import evaluate

SIZE = 10  # 10 x 10 frames: every track is small, medium and large have no ground truth


def _box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def _rle(mask):
    if mask is None:
        return None
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


# Four disjoint 10-pixel masks.
A0, A1 = _box(slice(0, 1), slice(None)), _box(slice(1, 2), slice(None))
B0, B1 = _box(slice(5, 6), slice(None)), _box(slice(6, 7), slice(None))


def _files(tmp_path, tracks, predictions, frames=2, size=SIZE):
    """A one-video ground truth of `tracks` (category, per-frame masks or None) and the
    results (category, per-frame masks or None, score); the --gt-json / --pred-json args."""
    gt = {
        "videos": [{"id": 3, "height": size, "width": size, "length": frames}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {
                "id": index + 1,
                "video_id": 3,
                "category_id": category,
                "segmentations": [_rle(m) for m in masks],
                "areas": [None if m is None else float(m.sum()) for m in masks],
                "iscrowd": 0,
            }
            for index, (category, masks) in enumerate(tracks)
        ],
    }
    results = [
        {"video_id": 3, "category_id": c, "segmentations": [_rle(m) for m in ms], "score": s}
        for c, ms, s in predictions
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    return ["--gt-json", str(tmp_path / "gt.json"), "--pred-json", str(tmp_path / "results.json")]


def _stats(tmp_path, tracks, predictions, frames=2, size=SIZE) -> dict:
    summary, _ = evaluate_files(*_files(tmp_path, tracks, predictions, frames, size)[1::2])
    return {key: summary[key] for key in VIS_STATS}


def _expect(stats: dict, **expected):
    """`expected` for the named stats, medium and large NaN (no such ground truth)."""
    for key, value in stats.items():
        if key in ("APm", "APl", "ARm", "ARl"):
            assert np.isnan(value), key
        else:
            assert value == pytest.approx(expected[key], abs=1e-12), key


def test_perfect_prediction_is_100(tmp_path):
    stats = _stats(tmp_path, [(1, [A0, A1])], [(1, [A0, A1], 0.5)])
    _expect(stats, **dict.fromkeys(VIS_STATS, 100.0))


def test_a_track_that_switches_identity_halfway(tmp_path):
    # Frame 0 on A, frame 1 on B: IoU with each 10 / (10 + 20) = 1/3, below every threshold.
    assert track_iou([_rle(A0), _rle(B1)], [_rle(A0), _rle(A1)]) == 1 / 3
    switching, right_b = (1, [A0, B1], 0.9), (1, [B0, B1], 0.8)
    stats = _stats(tmp_path, [(1, [A0, A1]), (1, [B0, B1])], [switching, right_b])
    # At every threshold: a false positive, then B (recall 1/2 at precision 1/2), A missed:
    # precision 1/2 at the 51 recall points 0, 0.01, ..., 0.5 of 101. The best single
    # prediction (the switching one) finds nothing.
    ap = 100 * 51 * 0.5 / 101
    _expect(stats, AP=ap, AP50=ap, AP75=ap, APs=ap, AR1=0, AR10=50, AR100=50, ARs=50)


def test_frames_where_a_track_is_absent(tmp_path):
    # Ground truth absent (null) in frames 2 and 3; the prediction adds a 10-pixel mask in
    # frame 2 and is absent in frame 3 too, which counts for neither: IoU 20 / 30 = 2/3,
    # a match at the thresholds 0.5 to 0.65 (4 of 10).
    truth = [A0, A1, None, None]
    prediction = [A0, A1, B0, None]
    assert track_iou([_rle(m) for m in prediction], [_rle(m) for m in truth]) == 2 / 3
    stats = _stats(tmp_path, [(1, truth)], [(1, prediction, 1.0)], frames=4)
    _expect(stats, AP=40, AP50=100, AP75=0, APs=40, AR1=40, AR10=40, AR100=40, ARs=40)


def test_a_track_is_as_large_as_its_mean_area_where_present(tmp_path):
    # 150 x 150 in frame 0 (22,500 pixels: medium, above 128^2), absent in frame 1, empty in
    # frame 2: the mean over the frames with an area is 22,500 (over all three: small).
    full, empty = np.ones((150, 150), np.uint8), np.zeros((150, 150), np.uint8)
    track = [full, None, empty]
    stats = _stats(tmp_path, [(1, track)], [(1, track, 1.0)], frames=3, size=150)
    assert stats["APm"] == pytest.approx(100) and stats["ARm"] == 100
    assert all(np.isnan(stats[key]) for key in ("APs", "APl", "ARs", "ARl"))


def test_a_prediction_of_another_category_does_not_match(tmp_path):
    stats = _stats(tmp_path, [(1, [A0, A1])], [(2, [A0, A1], 0.9)])
    _expect(stats, **dict.fromkeys(VIS_STATS, 0.0))


def test_no_prediction_scores_0_where_there_is_ground_truth(tmp_path):
    # As YTVOSeval on an empty result set: 0 with ground truth, -1 (here NaN) without.
    _expect(_stats(tmp_path, [(1, [A0, None])], []), **dict.fromkeys(VIS_STATS, 0.0))


def test_tool_json_output(tmp_path, capsys):
    args = _files(tmp_path, [(1, [A0, A1]), (2, [B0, None])], [(1, [A0, A1], 0.5)])
    evaluate.main(["vis", *args, "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert list(summary)[:12] == list(VIS_STATS)
    assert summary["AP"] == pytest.approx(50) and summary["AR100"] == 50  # cat found, dog not
    assert summary["APm"] is None and summary["ARl"] is None
    per_class = summary["per_class"]  # AP 100 is 1 / (1 + eps) in COCOeval
    assert per_class == [
        {"id": 1, "name": "cat", "AP": pytest.approx(100)},
        {"id": 2, "name": "dog", "AP": 0.0},
    ]
    evaluate.main(["vis", *args])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all")
    assert lines[0].endswith("= 0.500")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(video_id=9), "prediction 0: video_id 9 is not in the ground truth"),
        (lambda r: r.update(category_id=5), "prediction 0: category_id 5 is unknown"),
        (lambda r: r.pop("score"), r"prediction 0 lacks the key\(s\) \['score'\]"),
        (lambda r: r.update(score="high"), "prediction 0: score 'high' is not a number"),
        (
            lambda r: r["segmentations"].append(None),
            "prediction 0: segmentations has 3 frames, video 3 has 2",
        ),
        (
            lambda r: r["segmentations"].__setitem__(1, _rle(np.ones((4, 4), np.uint8))),
            r"prediction 0: segmentations\[1\] size \[4, 4\] differs from video 3's \[10, 10\]",
        ),
    ],
    ids=["video", "category", "score", "score-type", "frames", "size"],
)
def test_bad_predictions_are_one_error_line_naming_file_and_field(tmp_path, capsys, edit, message):
    args = _files(tmp_path, [(1, [A0, A1])], [(1, [A0, A1], 0.5)])
    results = json.loads((tmp_path / "results.json").read_text())
    edit(results[0])
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit) as stopped:
        run_tool(evaluate.main, None, ["vis", *args])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path / 'results.json'}: ")
    assert re.search(message, err), err


def test_ground_truth_with_the_wrong_number_of_frames_and_a_missing_file(tmp_path):
    args = _files(tmp_path, [(1, [A0, A1, None])], [])
    with pytest.raises(ValueError, match="gt.json: annotation 0: segmentations has 3 frames"):
        evaluate.main(["vis", *args])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate.main(["vis", "--gt-json", str(tmp_path / "missing.json"), *args[2:]])


def test_a_video_without_its_size_or_frame_count(tmp_path):
    args = _files(tmp_path, [(1, [A0, A1])], [])
    gt = json.loads((tmp_path / "gt.json").read_text())
    del gt["videos"][0]["length"]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(ValueError, match="gt.json: video 0: a video needs length or file_names"):
        evaluate.main(["vis", *args])
    del gt["videos"][0]["width"]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=r"gt.json: video 0 lacks the key\(s\) \['width'\]"):
        evaluate.main(["vis", *args])
