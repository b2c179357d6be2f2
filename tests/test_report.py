"""tools/report.py on hand-made run folders: the table beside the paper, and every picture."""

import csv
import json

import numpy as np
import pytest

from eomt.report import (
    find_runs,
    paper_row,
    per_prediction_loss,
    read_benchmarks,
    read_run,
    speed_points,
)
from tools import report


def make_run(root, name, group, seed, pq, miou, paper=None, curve=True, block_pqs=()):
    folder = root / name
    folder.mkdir(parents=True)
    confusion = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]]).tolist()
    results = {
        "panoptic": {"PQ": pq, "SQ": 80.0, "RQ": 70.0},
        "semantic": {
            "mIoU": miou,
            "per_class_iou": [70.0, 75.0, float("nan")],
            "confusion_matrix": confusion,
        },
    }
    for block, block_pq in enumerate(block_pqs):  # masked attention at evaluation
        results[f"panoptic_block{block}"] = {"PQ": block_pq, "SQ": 80.0, "RQ": 70.0}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "run.json").write_text(
        json.dumps({"name": name, "group": group, "seed": seed, "paper": paper})
    )
    if curve:
        records = [{"iteration": i, "loss": 10.0 / i} for i in (1, 2, 3)]
        records.append({"iteration": 3, "panoptic/PQ": pq, "semantic/mIoU": miou})
        (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    (folder / "semantic").mkdir()
    (folder / "semantic" / "per_class.csv").write_text(
        "class,IoU,ACC\ndisc,70,80\nsquare,75,85\nsky,nan,nan\n"
    )
    return folder


def test_seeds_are_averaged_beside_the_paper_and_every_picture_is_drawn(tmp_path, capsys):
    runs = tmp_path / "sweep"
    for seed, pq in enumerate((50.0, 52.0, 54.0)):
        make_run(
            runs,
            f"annealing-seed{seed}",
            "annealing",
            seed,
            pq,
            60.0 + seed,
            "table4.annealing_no_masking",
        )
    make_run(runs, "plain", "plain", None, 40.0, 45.0, curve=False, block_pqs=(30.0, 35.0))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(
        json.dumps({"run": "annealing", "params": 3.0e6, "gflops": 1.5, "fps": 200.0}) + "\n"
    )
    written = report.main(
        report.parse_args([str(runs), "--output", str(tmp_path / "rep"), "--benchmark", str(bench)])
    )
    with open(tmp_path / "rep" / "report.csv") as file:
        rows = {row["Run"]: row for row in csv.DictReader(file)}
    assert rows["annealing"]["Seeds"] == "3"
    assert rows["annealing"]["PQ"] == "52.0 ± 2.0"  # mean and sample standard deviation
    assert rows["annealing"]["PQ paper"] == "56.0"  # Table 4, annealing / no masking
    assert rows["annealing"]["mIoU"] == "61.0 ± 1.0" and rows["annealing"]["mIoU paper"] == "-"
    assert (rows["annealing"]["Params (M)"], rows["annealing"]["FPS"]) == ("3.0", "200.0")
    assert rows["plain"]["PQ"] == "40.0" and rows["plain"]["PQ paper"] == "-"
    assert (rows["plain"]["PQ block 0"], rows["plain"]["PQ block 1"]) == ("30.0", "35.0")
    assert rows["annealing"]["PQ block 0"] == "-"
    assert "| annealing | 3 | 52.0 ± 2.0 | 56.0 |" in capsys.readouterr().out
    names = {path.name for path in written}
    assert {
        "curves.png",
        "confusion_annealing.png",
        "confusion_plain.png",
        "per_class_iou.png",
        "accuracy_vs_speed.png",
    } <= names
    for path in written:
        assert path.stat().st_size > 100, path
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The paper's point (Table 4, annealing: 128 FPS on a GPU) beside ours; none beside CPU FPS.
    records = [read_run(folder) for folder in find_runs([runs])]
    for record in records:
        record.benchmark = {"fps": 200.0} if record.group == "annealing" else {}
    assert speed_points(records) == (
        "fps",
        [("annealing", 200.0, 52.0)],
        [("annealing", 128, 56.0)],
    )
    records[0].benchmark["device"] = "cpu"
    assert speed_points(records) == ("fps (CPU)", [("annealing", 200.0, 52.0)], [])
    # Without benchmark lines, no run has a speed: no accuracy-against-speed picture.
    unmeasured = report.main(report.parse_args([str(runs), "--output", str(tmp_path / "bare")]))
    assert "accuracy_vs_speed.png" not in {path.name for path in unmeasured}


def test_paper_rows_and_benchmark_lines_are_checked(tmp_path):
    assert paper_row("table1.step0_vit_adapter_m2f")["PQ"] == 57.1
    assert paper_row(None) == {}
    with pytest.raises(KeyError, match="no row 'table9.x'"):
        paper_row("table9.x")
    lines = tmp_path / "b.jsonl"
    lines.write_text('{"config": "c.yaml", "fps": 3}\n')
    with pytest.raises(ValueError, match="b.jsonl:1: no 'run' key"):
        read_benchmarks([lines])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        report.main(report.parse_args([str(tmp_path), "--output", str(tmp_path / "r")]))


def test_the_loss_curve_divides_by_the_supervised_predictions():
    masked = {"loss": 30.0, "loss_class_0": 1.0, "loss_class_1": 1.0, "loss_class_2": 1.0}
    assert per_prediction_loss(masked) == 10.0  # three predictions: two query blocks + final
    assert per_prediction_loss({"loss": 8.0, "loss_class_0": 1.0}) == 8.0
    assert per_prediction_loss({"loss": 8.0}) == 8.0  # no per-prediction terms logged
