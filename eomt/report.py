"""Collect runs (results.json, metrics.jsonl, run.json of a sweep) into one table beside the
paper's values (configs/paper_results.yaml), and draw what researchers look at: training and
evaluation curves, confusion matrices, per-class IoU and accuracy against speed.
"""

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

PAPER_RESULTS = Path(__file__).resolve().parents[1] / "configs" / "paper_results.yaml"
# (results.json section, key, column name): the headline metrics of the three tasks.
METRICS = (("panoptic", "PQ", "PQ"), ("semantic", "mIoU", "mIoU"), ("instance", "AP", "AP"))


@dataclass
class RunRecord:
    name: str
    group: str
    folder: Path
    results: dict
    curve: list[dict] = field(default_factory=list)
    paper: dict = field(default_factory=dict)
    benchmark: dict = field(default_factory=dict)

    def metric(self, section: str, key: str) -> float | None:
        value = self.results.get(section, {}).get(key)
        return None if value is None else float(value)


def paper_row(key: str | None, path: Path = PAPER_RESULTS) -> dict:
    """configs/paper_results.yaml's row `<table>.<row>` ({} for no key)."""
    if not key:
        return {}
    table, _, row = key.partition(".")
    values = OmegaConf.to_container(OmegaConf.load(path))
    if table not in values or row not in values[table]:
        raise KeyError(f"{path}: no row '{key}' (tables: {sorted(values)})")
    return values[table][row]


def find_runs(folders: list[str | Path]) -> list[Path]:
    """Run folders (holding results.json) in or under `folders`, sorted."""
    found = set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"not a folder: {folder}")
        found.update(path.parent for path in folder.rglob("results.json"))
    if not found:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, folders))}")
    return sorted(found)


def read_run(folder: Path) -> RunRecord:
    """One run: its results, its metrics.jsonl records, and, when a sweep ran it, its group
    and paper row (run.json)."""
    results = json.loads((folder / "results.json").read_text())
    meta_file = folder / "run.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    curve_file = folder / "metrics.jsonl"
    curve = []
    if curve_file.is_file():
        curve = [json.loads(line) for line in curve_file.read_text().splitlines() if line.strip()]
    return RunRecord(
        name=folder.name,
        group=meta.get("group", folder.name),
        folder=folder,
        results=results,
        curve=curve,
        paper=paper_row(meta.get("paper")),
    )


def read_benchmarks(paths: list[str | Path]) -> dict[str, dict]:
    """tools/benchmark.py JSON lines by the run (or group) their "run" key names."""
    lines = {}
    for path in paths:
        for number, text in enumerate(Path(path).read_text().splitlines(), 1):
            if text.strip():
                record = json.loads(text)
                if "run" not in record:
                    raise ValueError(f"{path}:{number}: no 'run' key naming the run it measured")
                lines[record["run"]] = record
    return lines


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def _block_count(runs: list[RunRecord], section: str) -> int:
    """How many query blocks have their own `section` results (`<section>_block<i>`)."""
    prefix = f"{section}_block"
    return max(
        (
            int(name[len(prefix) :]) + 1
            for r in runs
            for name in r.results
            if name.startswith(prefix)
        ),
        default=0,
    )


def table(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """One row per group (the seeds of a run averaged, ± their standard deviation): each
    headline metric, the paper's value beside it, params, GFLOPs and FPS where measured."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    present = [m for m in METRICS if any(r.metric(m[0], m[1]) is not None for r in runs)]
    header = ["Run", "Seeds"]
    for _, _, column in present:
        header += [column, f"{column} paper"]
    # Per query block, where masked attention was on at evaluation (test.block_metrics).
    blocks = [
        (f"{section}_block{i}", key, f"{column} block {i}")
        for section, key, column in present
        for i in range(_block_count(runs, section))
    ]
    header += [column for _, _, column in blocks]
    header += ["Params (M)", "GFLOPs", "FPS"]
    rows = []
    for group, members in groups.items():
        row = [group, str(len(members))]
        paper = members[0].paper
        for section, key, column in present:
            values = [v for r in members if (v := r.metric(section, key)) is not None]
            row += [_mean_spread(values), str(paper.get(column, "-"))]
        for section, key, _ in blocks:
            row.append(
                _mean_spread([v for r in members if (v := r.metric(section, key)) is not None])
            )
        bench = members[0].benchmark
        params = bench.get("params")
        row += [
            "-" if params is None else f"{params / 1e6:.1f}",
            str(bench.get("gflops", "-")),
            str(bench.get("fps", "-")),
        ]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


# -- pictures (matplotlib, imported when drawing) -----------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _group_colors(runs: list[RunRecord]) -> dict[str, str]:
    groups = list(dict.fromkeys(run.group for run in runs))
    return {group: f"C{index % 10}" for index, group in enumerate(groups)}


def per_prediction_loss(record: dict) -> float:
    """A logged loss divided by the number of predictions it sums (`loss_class_<i>` keys):
    masked attention supervises one prediction per query block besides the final one, so
    runs with and without it compare on this, not on the sum."""
    predictions = sum(key.startswith("loss_class_") for key in record) or 1
    return record["loss"] / predictions


def draw_curves(runs: list[RunRecord], path: Path) -> Path:
    """The training loss per supervised prediction and the evaluation metrics against
    iterations, every run on shared axes (one colour per group: the seeds of a run share it)."""
    plt = _pyplot()
    colors = _group_colors(runs)
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(11, 4))
    labelled = {"loss": set(), "metric": set()}

    def label(axes: str, group: str) -> str | None:
        first = group not in labelled[axes]
        labelled[axes].add(group)
        return group if first else None

    for run in runs:
        losses = [
            (r["iteration"], per_prediction_loss(r)) for r in run.curve if r.get("loss") is not None
        ]
        if losses:
            loss_axes.plot(
                *zip(*losses), color=colors[run.group], alpha=0.8, label=label("loss", run.group)
            )
        for section, key, _ in METRICS:
            points = [
                (r["iteration"], r[f"{section}/{key}"])
                for r in run.curve
                if f"{section}/{key}" in r
            ]
            if points:
                style = {"PQ": "o-", "mIoU": "s--", "AP": "^:"}[key]
                metric_axes.plot(
                    *zip(*points), style, color=colors[run.group], label=label("metric", run.group)
                )
    loss_axes.set(
        xlabel="iteration", ylabel="loss per supervised prediction", yscale="log", title="loss"
    )
    metric_axes.set(xlabel="iteration", ylabel="%", title="evaluation (o PQ, s mIoU, ^ AP)")
    for axes in (loss_axes, metric_axes):
        if axes.get_legend_handles_labels()[1]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def class_names(run: RunRecord) -> list[str]:
    """The class names of the run's semantic evaluation (its per_class.csv)."""
    per_class = run.folder / "semantic" / "per_class.csv"
    if per_class.is_file():
        with open(per_class) as file:
            return [row["class"] for row in csv.DictReader(file)]
    count = len(run.results["semantic"]["confusion_matrix"])
    return [str(i) for i in range(count)]


def draw_confusion(run: RunRecord, path: Path) -> Path:
    """The mIoU confusion matrix, each row normalised to its ground-truth pixels."""
    plt = _pyplot()
    matrix = np.array(run.results["semantic"]["confusion_matrix"], dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    names = class_names(run)
    size = 1.0 + 0.5 * len(names)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    if len(names) <= 30:
        for i, j in np.ndindex(shares.shape):
            if totals[i, 0] > 0:
                color = "white" if shares[i, j] > 0.5 else "black"
                axes.text(
                    j,
                    i,
                    f"{100 * shares[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=color,
                )
    axes.set(xlabel="prediction", ylabel="ground truth", title=f"{run.group}: % of each row")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw_per_class(runs: list[RunRecord], path: Path) -> Path:
    """Per-class IoU, one bar per group (the first seed's run)."""
    plt = _pyplot()
    firsts = list({run.group: run for run in reversed(runs)}.values())[::-1]
    firsts = [run for run in firsts if "per_class_iou" in run.results.get("semantic", {})]
    names = class_names(firsts[0])
    width = 0.8 / len(firsts)
    figure, axes = plt.subplots(figsize=(max(6, 0.6 * len(names) * len(firsts)), 4))
    for index, run in enumerate(firsts):
        ious = [
            0 if v is None or math.isnan(v) else v for v in run.results["semantic"]["per_class_iou"]
        ]
        axes.bar(np.arange(len(names)) + index * width, ious, width, label=run.group)
    axes.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    axes.set(ylabel="IoU (%)", title="per-class IoU")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def speed_points(runs: list[RunRecord], metric: str = "PQ") -> tuple[str, list, list]:
    """The points of `draw_accuracy_vs_speed`: the speed key ("fps", or "gflops" where no FPS
    was measured), ours as (group, speed, mean metric) and the paper's as (group, speed,
    metric). The paper's FPS are GPU figures: none of them beside FPS measured on a CPU."""
    section = {"PQ": "panoptic", "mIoU": "semantic", "AP": "instance"}[metric]
    speed_key = "fps" if any(r.benchmark.get("fps") for r in runs) else "gflops"
    on_cpu = speed_key == "fps" and any(r.benchmark.get("device") == "cpu" for r in runs)
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    ours, paper_points = [], []
    for group, members in groups.items():
        paper = members[0].paper
        if not on_cpu and metric in paper and speed_key in paper:
            paper_points.append((group, paper[speed_key], paper[metric]))
        values = [v for r in members if (v := r.metric(section, metric)) is not None]
        speed = members[0].benchmark.get(speed_key)
        if values and speed:
            ours.append((group, speed, statistics.fmean(values)))
    return ("fps (CPU)" if on_cpu else speed_key), ours, paper_points


def draw_accuracy_vs_speed(runs: list[RunRecord], path: Path, metric: str = "PQ") -> Path:
    """`metric` against FPS (or GFLOPs where no FPS was measured): the paper's points beside
    ours (the paper's Figure 1)."""
    plt = _pyplot()
    speed_key, ours, paper_points = speed_points(runs, metric)
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for group, speed, value in paper_points:
        axes.scatter(speed, value, marker="s", facecolors="none", edgecolors="gray")
        axes.annotate(f"{group} (paper)", (speed, value), fontsize=7)
    for group, speed, value in ours:
        axes.scatter(speed, value, marker="o")
        axes.annotate(group, (speed, value), fontsize=7)
    paper = "the paper's (squares)" if paper_points else "no paper point on these axes"
    axes.set(
        xlabel={"fps": "FPS", "fps (CPU)": "FPS (CPU)", "gflops": "GFLOPs"}[speed_key],
        ylabel=metric,
        title=f"{metric} against {speed_key}: ours (dots), {paper}",
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
