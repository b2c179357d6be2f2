"""tools/report.py on run folders written here in the formats of tools/sweep.py (run.json) and
the trainer (results.json, metrics.jsonl, finished.json, evaluations/), and of
tools/evaluate_checkpoints.py (checkpoint_series/): which folders are runs, which runs are
counted, the table beside the paper, the report's own folder, its pictures and its errors."""

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.collections import PathCollection

import eomt.report
from eomt.cli import run_tool
from eomt.report import (
    ReportError,
    find_runs,
    group_colors,
    paper_row,
    per_prediction_loss,
    read_benchmarks,
    read_run,
    speed_points,
)
from tools import report

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("disc", "square", "sky")


def results_of(pq: float, miou: float, block_pqs=()) -> dict:
    """A results.json as the trainer writes it (the evaluators' results, arrays as lists)."""
    results = {
        "panoptic": {"PQ": pq, "SQ": 80.0, "RQ": 70.0},
        "semantic": {
            "mIoU": miou,
            "fwIoU": miou,
            "per_class_iou": [miou + 5, miou - 5, float("nan")],  # no sky pixel in val
            "per_class_acc": [80.0, 85.0, float("nan")],
            "confusion_matrix": [[8, 2, 0], [1, 9, 0], [0, 0, 0]],
        },
    }
    for block, block_pq in enumerate(block_pqs):  # masked attention at evaluation
        results[f"panoptic_block{block}"] = {"PQ": block_pq, "SQ": 80.0, "RQ": 70.0}
    return results


def evaluation_record(iteration: int, results: dict) -> dict:
    """metrics.jsonl's record of an evaluation: the scalar results as task/key."""
    scalars = {
        f"{task}/{key}": float(value)
        for task, values in results.items()
        for key, value in values.items()
        if isinstance(value, (int, float))
    }
    return {"iteration": iteration, **scalars}


def write_run(
    root: Path,
    name: str,
    pq: float,
    miou: float = 60.0,
    *,
    sweep: str | None = "s",
    group: str | None = None,
    seed: int | None = None,
    paper: str | None = None,
    evaluates: str | None = None,
    done: bool = True,
    periodic=(),
    block_pqs=(),
    max_iter: int = 40,
) -> Path:
    """A run's folder as tools/sweep.py and the trainer leave it: run.json (for a sweep's run,
    `sweep` not None), config.yaml, metrics.jsonl (training records every 10 iterations, with
    one loss_class_<i> per supervised prediction, then the evaluations), the periodic
    evaluations (`periodic`: {iteration: PQ}) in evaluations/, and, when `done`,
    results.json, semantic/per_class.csv and finished.json, written last."""
    folder = root / sweep / name if sweep is not None else root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"output_dir: {folder}\nseed: {seed or 0}\n")
    if sweep is not None:
        command = [sys.executable, "tools/train_net.py", "--config-file", "c.yaml"]
        record = {
            "name": name,
            "group": group or name,
            "sweep": sweep,
            "seed": seed,
            "paper": paper,
            "config": "c.yaml",
            "overrides": [f"seed={seed}"],
            "digest": "0" * 64,
            "command": [*command, f"output_dir={folder}"],
            "attempt": {"started": "t0", "host": socket.gethostname()},
        }
        if evaluates:
            trained = {"mode": "train", "iteration": max_iter, "checkpoint": "model.pth"}
            record["evaluated"] = {"run": evaluates, "trained": trained}
        if done:
            record["attempt"].update(ended="t1", exit_status=0)
        (folder / "run.json").write_text(json.dumps(record, indent=1))
    records = []
    if not evaluates:
        for iteration in range(10, (max_iter if done else max_iter // 2) + 1, 10):
            loss = {f"loss_class_{i}": 1.0 for i in range(3)}
            records.append({"iteration": iteration, "loss": 300.0 / iteration, **loss})
    for iteration, periodic_pq in dict(periodic).items():
        results = results_of(periodic_pq, miou)
        records.append(evaluation_record(iteration, results))
        (folder / "evaluations").mkdir(exist_ok=True)
        path = folder / "evaluations" / f"iteration_{iteration:07d}.json"
        path.write_text(json.dumps(results))
    if done:
        results = results_of(pq, miou, block_pqs)
        records.append(evaluation_record(max_iter, results))  # eval-only: the checkpoint's
        (folder / "results.json").write_text(json.dumps(results, indent=1))
        (folder / "semantic").mkdir()
        (folder / "semantic" / "per_class.csv").write_text(
            "class,IoU,ACC\n" + "".join(f"{c},70,80\n" for c in CLASSES)
        )
        finished = {
            "mode": "evaluate" if evaluates else "train",
            "iteration": max_iter,
            "checkpoint": f"model_{max_iter:07d}.pth",
            "results": "results.json",
            "time": "t1",
        }
        (folder / "finished.json").write_text(json.dumps(finished) + "\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def write_checkpoint_series(run: Path, pqs: dict[int, float]) -> None:
    """What tools/evaluate_checkpoints.py adds to a run: checkpoint_series.jsonl, its picture
    and each checkpoint's results (results.json, semantic/) in checkpoint_series/model_N/."""
    lines = []
    for iteration, pq in pqs.items():
        folder = run / "checkpoint_series" / f"model_{iteration:07d}"
        (folder / "semantic").mkdir(parents=True)
        results = results_of(pq, 50.0)
        (folder / "results.json").write_text(json.dumps(results))
        (folder / "config.yaml").write_text("seed: 0\n")  # were it there, still not a run
        (folder / "semantic" / "per_class.csv").write_text("class,IoU,ACC\ndisc,1,1\n")
        checkpoint = {"checkpoint": f"model_{iteration:07d}.pth"}
        lines.append(evaluation_record(iteration, results) | checkpoint)
    (run / "checkpoint_series.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "checkpoint_series.png").write_bytes(b"\x89PNG\r\n\x1a\n")


def run_report(*argv) -> tuple[list[Path], dict[str, dict]]:
    """tools/report.py's main; the files it wrote and report.csv's rows by group."""
    args = report.parse_args([str(a) for a in argv])
    written = report.main(args)
    with open(Path(args.output) / "report.csv") as file:
        rows = {f"{row['Sweep']}/{row['Run']}": row for row in csv.DictReader(file)}
    return written, rows


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report draws, by file name, as they were saved."""
    saved = {}
    original = eomt.report._save

    def keep(figure, path):
        figure.canvas.draw()  # tick labels are laid out when drawn
        saved[Path(path).name] = figure
        return original(figure, path)

    monkeypatch.setattr(eomt.report, "_save", keep)
    return saved


def test_seeds_are_averaged_beside_the_paper_and_every_picture_is_drawn(tmp_path, capsys):
    runs = tmp_path / "sweeps"
    for seed, pq in enumerate((50.0, 52.0, 54.0)):
        write_run(
            runs,
            f"annealing-seed{seed}",
            pq,
            60.0 + seed,
            group="annealing",
            seed=seed,
            paper="table4.annealing_no_masking",
        )
    write_run(runs, "plain", 40.0, 45.0, block_pqs=(30.0, 35.0))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(
        json.dumps({"run": "annealing", "params": 3.0e6, "gflops": 1.5, "fps": 200.0}) + "\n"
    )
    written, rows = run_report(runs, "--output", tmp_path / "rep", "--benchmark", bench)
    assert rows["s/annealing"]["Seeds"] == "3"
    assert rows["s/annealing"]["PQ"] == "52.0 ± 2.0"  # mean and sample standard deviation
    assert rows["s/annealing"]["PQ paper"] == "56.0"  # Table 4, annealing / no masking
    assert rows["s/annealing"]["mIoU"] == "61.0 ± 1.0"
    assert rows["s/annealing"]["mIoU paper"] == "-"
    assert (rows["s/annealing"]["Params (M)"], rows["s/annealing"]["FPS"]) == ("3.0", "200.0")
    assert rows["s/plain"]["PQ"] == "40.0" and rows["s/plain"]["PQ paper"] == "-"
    assert (rows["s/plain"]["PQ block 0"], rows["s/plain"]["PQ block 1"]) == ("30.0", "35.0")
    assert rows["s/annealing"]["PQ block 0"] == "-"
    assert "| s | annealing | 3 | 52.0 ± 2.0 | 56.0 |" in capsys.readouterr().out
    names = {path.name for path in written}
    assert names == {
        "report.md",
        "report.csv",
        "report.json",
        "training_loss.png",
        "evaluation.png",  # one evaluation per run: no evaluation curves
        "confusion_annealing.png",
        "confusion_plain.png",
        "per_class_iou.png",
        "accuracy_vs_speed.png",
    }
    for path in written:
        assert path.stat().st_size > 100, path
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The paper's point (Table 4, annealing: 128 FPS on a GPU) beside ours; none beside CPU FPS.
    records = [read_run(folder) for folder in find_runs([runs])]
    for record in records:
        record.benchmark = {"fps": 200.0} if record.run == "annealing" else {}
    assert speed_points(records) == (
        "fps",
        [("s/annealing", 200.0, 52.0)],
        [("s/annealing", 128, 56.0)],
    )
    records[0].benchmark["device"] = "cpu"
    assert speed_points(records) == ("fps (CPU)", [("s/annealing", 200.0, 52.0)], [])
    # Without benchmark lines, no run has a speed: no accuracy-against-speed picture.
    unmeasured, _ = run_report(runs, "--output", tmp_path / "bare")
    assert "accuracy_vs_speed.png" not in {path.name for path in unmeasured}


def test_checkpoint_series_are_not_runs(tmp_path):
    """After tools/evaluate_checkpoints.py on two runs (of a sweep, and plain training runs
    given on the command line), one row per run: no model_* rows nor pictures."""
    sweep = tmp_path / "sweeps"
    plain = tmp_path / "plain"
    folders = [
        write_run(sweep, "a", 37.6),
        write_run(sweep, "b", 30.0),
        write_run(plain, "run1", 20.0, sweep=None),
        write_run(plain, "run2", 25.0, sweep=None),
    ]
    for folder in folders:
        write_checkpoint_series(folder, {10: 0.0, 20: 10.0, 30: 37.5})
    written, rows = run_report(sweep, plain / "run1", plain / "run2", "--output", tmp_path / "r")
    assert set(rows) == {"s/a", "s/b", "-/run1", "-/run2"}
    assert [row["Seeds"] for row in rows.values()] == ["1"] * 4
    assert (rows["s/a"]["PQ"], rows["-/run2"]["PQ"]) == ("37.6", "25.0")
    assert not any("model_" in path.name for path in written)
    assert {p.name for p in written if p.name.startswith("confusion_")} == {
        "confusion_s--a.png",  # runs of a sweep beside plain ones: <sweep>--<run>
        "confusion_s--b.png",
        "confusion_run1.png",
        "confusion_run2.png",
    }
    # Under a folder, a plain run is not searched for: only sweeps' runs (run.json) are.
    assert find_runs([tmp_path]) == sorted(folders[:2])
    # A checkpoint's own folder is no run, given or not.
    with pytest.raises(ReportError, match="no run to report in"):
        find_runs([folders[0] / "checkpoint_series" / "model_0000010"])


def test_two_sweeps_with_the_same_run_name_stay_two_groups(tmp_path):
    for sweep, pqs in (("lr_low", (40.0, 42.0)), ("lr_high", (50.0, 54.0))):
        for seed, pq in enumerate(pqs):
            write_run(
                tmp_path / "out", f"base-seed{seed}", pq, sweep=sweep, group="base", seed=seed
            )
    _, rows = run_report(tmp_path / "out", "--output", tmp_path / "r")
    assert {group: row["PQ"] for group, row in rows.items()} == {
        "lr_high/base": "52.0 ± 2.8",
        "lr_low/base": "41.0 ± 1.4",
    }
    assert {row["Seeds"] for row in rows.values()} == {"2"}


def test_runs_not_done_are_named_and_not_counted(tmp_path, capsys):
    """An interrupted run's periodic evaluation (even in an old results.json) never reads as
    final; failed, running and set-aside runs are listed with their state."""
    root = tmp_path / "sweeps"
    write_run(root, "masking-seed0", 37.6, group="masking", seed=0)
    killed = write_run(
        root, "masking-seed1", 0, group="masking", seed=1, done=False, periodic={10: 0.0}
    )
    (killed / "results.json").write_text(json.dumps(results_of(0.0, 26.9)))  # an older trainer
    (killed / "model_0000010.pth").write_bytes(b"")
    record = json.loads((killed / "run.json").read_text())
    record["attempt"].update(ended="t1", exit_status=-9)
    (killed / "run.json").write_text(json.dumps(record))
    broken = write_run(root, "broken", 1.0, done=False)
    (broken / "FAILED").write_text("exit status 1: ValueError: bad key\n")
    live = write_run(root, "live", 1.0, done=False)
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "since": "t"}
    (live / "RUNNING").write_text(json.dumps(lock))
    aside = write_run(root, "masking-seed2", 99.0, group="masking", seed=2)
    aside.rename(aside.with_name("masking-seed2.stale-20250101-000000"))

    written, rows = run_report(root, "--output", tmp_path / "r")
    assert set(rows) == {"s/masking"}
    assert (rows["s/masking"]["Seeds"], rows["s/masking"]["PQ"]) == ("1", "37.6")
    out = capsys.readouterr().out
    listed = out.split("Not counted (not done):")[1]
    assert (
        "s/masking-seed1: interrupted (killed by SIGKILL; resumes from model_0000010.pth)" in listed
    )
    assert "s/broken: failed (exit status 1: ValueError: bad key)" in listed
    assert f"s/live: running (pid {os.getpid()} on " in listed
    assert "s/masking-seed2: set aside (the folder of run masking-seed2, renamed" in listed
    assert (tmp_path / "r" / "report.md").read_text().strip() == out.strip()
    manifest = json.loads((tmp_path / "r" / "report.json").read_text())
    states = {run["name"]: (run["state"], run["counted"]) for run in manifest["runs"]}
    assert states["masking-seed1"] == ("interrupted", False)
    assert states["masking-seed0"] == ("done", True)
    # The picture of evaluations holds the done run only: no curve of the killed run's.
    assert not any(path.name == "evaluation_curves.png" for path in written)


def test_the_report_owns_its_folder(tmp_path):
    """A rebuilt report leaves no stale picture; a foreign non-empty folder is refused."""
    root = tmp_path / "sweeps"
    write_run(root, "a", 40.0)
    write_run(root, "b", 45.0)
    output = tmp_path / "r"
    run_report(root, "--output", output)
    assert (output / "confusion_b.png").is_file()
    (output / "notes.txt").write_text("mine")  # not the report's: kept
    shutil.rmtree(root / "s" / "b")
    written, rows = run_report(root, "--output", output)
    assert set(rows) == {"s/a"}
    assert not (output / "confusion_b.png").exists()
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [p.name for p in written] + ["notes.txt"]
    )
    manifest = json.loads((output / "report.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in written)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "paper.tex").write_text("")
    with pytest.raises(ReportError, match="foreign is not empty and not a report's folder"):
        report.main(report.parse_args([str(root), "--output", str(foreign)]))
    assert [p.name for p in foreign.iterdir()] == ["paper.tex"]


def test_colours_are_stable_across_reports_and_distinct_in_one(tmp_path, figures):
    """A group's colour comes from its name, not from the other groups of the report."""
    first = group_colors(["t4/annealing", "t4/masking", "t4/never"])
    second = group_colors(["t4/masking", "t1/step0", "t4/annealing", "t1/step5", "t2/small"])
    assert first["t4/annealing"] == second["t4/annealing"]
    assert first["t4/masking"] == second["t4/masking"]
    assert len(set(second.values())) == 5
    palette = eomt.report.PALETTE + eomt.report.MORE_COLORS
    many = group_colors([f"sweep/run{i}" for i in range(len(palette))])
    assert len(set(many.values())) == len(palette)  # no two alike while any is left
    # ... and in the pictures: the same run, the same colour, in two reports.
    write_run(tmp_path / "one", "masking", 40.0, sweep="t4")
    write_run(tmp_path / "one", "annealing", 45.0, sweep="t4")
    write_run(tmp_path / "two", "aaa", 35.0, sweep="t4")  # first by name and by folder
    write_run(tmp_path / "two", "annealing", 45.0, sweep="t4")
    colours = []
    for name in ("one", "two"):
        run_report(tmp_path / name, "--output", tmp_path / f"r{name}")
        axes = figures["per_class_iou.png"].axes[0]
        colours.append({bar.get_label(): bar.patches[0].get_facecolor() for bar in axes.containers})
    assert colours[0]["annealing"] == colours[1]["annealing"]


def test_pictures_read(tmp_path, figures):
    """One evaluation per run: a dot chart naming every group (the evaluate: one too) in
    every panel, a marker per seed and the seeds' mean ± std; curves only with periodic
    evaluations, with legends naming runs and seeds; log ticks as plain numbers; the
    confusion matrix's colour bar in the title's percent, 0 to 100."""
    root = tmp_path / "sweeps"
    for seed in (0, 1, 2):
        common = {"seed": seed, "sweep": "t4"}
        write_run(root, f"masking-seed{seed}", 60.0 + seed, group="masking", **common)
        write_run(
            root,
            f"masking_eval-seed{seed}",
            50.0 + seed,
            group="masking_eval",
            evaluates=f"masking-seed{seed}",
            **common,
        )
    run_report(root, "--output", tmp_path / "r")
    assert "evaluation_curves.png" not in figures
    evaluation = figures["evaluation.png"]
    panels = [axes for axes in evaluation.axes if axes.get_xlabel()]
    assert [axes.get_xlabel() for axes in panels] == ["PQ (%)", "mIoU (%)"]
    rows = [label.get_text() for label in panels[0].get_yticklabels()]
    assert rows == ["masking_eval\n(evaluates masking)", "masking"]  # rows 0 and 1
    for axes in panels:
        # Three seeds of each group on its row: six dots, in three markers; no line.
        dots = [c for c in axes.collections if isinstance(c, PathCollection)]
        assert sorted(round(d.get_offsets()[0][1]) for d in dots) == [0, 0, 0, 1, 1, 1]
        assert len({tuple(map(tuple, d.get_paths()[0].vertices)) for d in dots}) == 3
        assert all(len(line.get_xdata()) <= 2 for line in axes.get_lines())
    legend = [t.get_text() for t in evaluation.legends[0].get_texts()]
    assert legend == ["seed 0", "seed 1", "seed 2", "mean ± std of the seeds"]
    loss = figures["training_loss.png"].axes[0]
    ticks = [label.get_text() for label in loss.get_yticklabels()]
    assert len(ticks) >= 3 and all(t.replace(".", "").isdigit() for t in ticks), ticks
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["masking (mean of 3 seeds)"]
    confusion = figures["confusion_masking.png"]
    colour_bar = confusion.axes[-1]
    assert colour_bar.get_ylim() == (0.0, 100.0)
    assert "% of each ground-truth row" in confusion.axes[0].get_title()
    assert "%" in colour_bar.get_ylabel()
    shown = [t.get_text() for t in confusion.axes[0].texts]
    assert shown[:2] == ["80", "20"]  # of the disc pixels, in percent

    # Periodic evaluations: curves, one line per run, the evaluate: run at the iteration it
    # scored; the legend names the groups and the seeds.
    periodic = tmp_path / "periodic"
    for seed in (0, 1):
        write_run(periodic, f"m-seed{seed}", 60.0, group="m", seed=seed, periodic={20: 30.0})
        write_run(periodic, f"e-seed{seed}", 50.0, group="e", seed=seed, evaluates=f"m-seed{seed}")
    run_report(periodic, "--output", tmp_path / "p")
    curves = figures["evaluation_curves.png"]
    pq = curves.axes[0]
    assert pq.get_title() == "PQ"
    lines = {len(line.get_xdata()): line for line in pq.get_lines()}
    assert list(lines[2].get_xdata()) == [20, 40] and list(lines[1].get_xdata()) == [40]
    legend = [t.get_text() for t in curves.legends[0].get_texts()]
    assert legend == ["e", "m", "seed 0", "seed 1"]


def test_paper_rows_and_benchmark_lines_are_checked(tmp_path):
    assert paper_row("table1.step0_vit_adapter_m2f")["PQ"] == 57.1
    assert paper_row(None) == {}
    with pytest.raises(ReportError, match="no row 'table9.x'"):
        paper_row("table9.x")
    lines = tmp_path / "b.jsonl"
    lines.write_text('{"config": "c.yaml", "fps": 3}\n')
    with pytest.raises(ReportError, match="b.jsonl:1: no 'run' key"):
        read_benchmarks([lines])
    lines.write_text('{"run": "a", "fps": 3}\n{"run": "b", "fps": 3')  # cut while written
    with pytest.raises(ReportError, match="b.jsonl:2: not JSON"):
        read_benchmarks([lines])


def user_error(tmp_path, case: str) -> tuple[list[str], str]:
    """The arguments of each user error, and what its error line must name."""
    root = tmp_path / "sweeps"
    if case == "missing folder":
        return [str(tmp_path / "nowhere"), "--output", str(tmp_path / "r")], "nowhere"
    if case == "nothing to report":
        (tmp_path / "empty").mkdir()
        return [str(tmp_path / "empty"), "--output", str(tmp_path / "r")], "empty"
    if case == "no run done":
        write_run(root, "a", 1.0, done=False)
        return [str(root), "--output", str(tmp_path / "r")], "no run is done (s/a: interrupted)"
    write_run(root, "a", 40.0, paper="table4.masking_masking")
    if case == "foreign output":
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "x.txt").write_text("")
        return [str(root), "--output", str(tmp_path / "r")], "r is not empty"
    if case == "unwritable output":  # under a file: even root cannot write there
        (tmp_path / "file").write_text("")
        return [str(root), "--output", str(tmp_path / "file" / "r")], "file/r"
    if case == "unknown paper row":
        record = json.loads((root / "s" / "a" / "run.json").read_text())
        (root / "s" / "a" / "run.json").write_text(json.dumps(record | {"paper": "table4.x"}))
        return [str(root), "--output", str(tmp_path / "r")], "a/run.json: paper row 'table4.x'"
    if case == "missing benchmark":
        return [str(root), "--output", str(tmp_path / "r"), "--benchmark", "b.jsonl"], "b.jsonl"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing folder",
        "nothing to report",
        "no run done",
        "foreign output",
        "unwritable output",
        "unknown paper row",
        "missing benchmark",
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, case):
    argv, named = user_error(tmp_path, case)
    with pytest.raises(SystemExit) as stop:
        run_tool(report.main, report.parse_args, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert named in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_is_one_error_line(tmp_path, capsys):
    write_run(tmp_path / "sweeps", "a", 40.0)
    output = tmp_path / "r"
    output.mkdir(mode=0o555)
    with pytest.raises(SystemExit) as stop:
        run_tool(
            report.main, report.parse_args, [str(tmp_path / "sweeps"), "--output", str(output)]
        )
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write into {output}: Permission denied\n"


def test_the_command_prints_one_error_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "tools/report.py", str(tmp_path / "nowhere"), "--output", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stderr) == (2, f"error: no such folder: {tmp_path}/nowhere\n")


def test_the_loss_curve_divides_by_the_supervised_predictions():
    masked = {"loss": 30.0, "loss_class_0": 1.0, "loss_class_1": 1.0, "loss_class_2": 1.0}
    assert per_prediction_loss(masked) == 10.0  # three predictions: two query blocks + final
    assert per_prediction_loss({"loss": 8.0, "loss_class_0": 1.0}) == 8.0
    assert per_prediction_loss({"loss": 8.0}) == 8.0  # no per-prediction terms logged


def test_video_runs_are_reported_beside_the_videomt_zoo(tmp_path):
    """A VidEoMT run's headline metrics (vis AP, vps VPQ, vss mIoU) get columns, with the
    authors' zoo values beside them."""
    runs = tmp_path / "sweeps"
    folder = write_run(runs, "ytvis19_large", 0.0, paper="videomt.ytvis19_large")
    results = {"vis": {"AP": 61.5, "AR10": 70.0}, "vps": {"VPQ": 50.25}, "vss": {"mIoU": 60.0}}
    (folder / "results.json").write_text(json.dumps(results))
    _, rows = run_report(runs, "--output", tmp_path / "rep")
    row = rows["s/ytvis19_large"]
    assert (row["AP"], row["AP paper"]) == ("61.5", "68.6")
    assert row["VPQ"] == "50.2" and row["VPQ paper"] == "-"
    assert row["mIoU"] == "60.0"
