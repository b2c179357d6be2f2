"""Collect runs into one table beside the paper's values (configs/paper_results.yaml), and draw
what researchers look at: the training loss, the evaluation metrics of every run and seed,
confusion matrices, per-class IoU and accuracy against speed.

What counts as a run:

- a run folder of a sweep (tools/sweep.py), found anywhere under the folders given: it holds
  the runner's `run.json` (its sweep, run, seed, command and config digest); its group is its
  sweep and run (`<sweep>/<run>`), over whose seeds the table averages;
- a plain training run's folder (results.json and config.yaml) only when it is itself one of
  the folders given; its group is its folder's name.

Nothing else is a run: a checkpoint series (`checkpoint_series/model_NNNNNNN/`, written by
tools/evaluate_checkpoints.py), a run's `evaluations/` or task folders are never searched. A
run enters the table only when it is done (`finished.json`: training reached its last
iteration and the final evaluation is written, or its evaluation is); the others are listed,
not counted, with their state (running, failed, interrupted, new), so that the numbers of an
unfinished run never read as final. So is a folder the sweep moved aside as stale.

The output folder belongs to the report: `report.json` lists what it wrote, a new report
removes all of it first (no stale pictures), and a non-empty folder without it is refused.
"""

import csv
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from eomt.sweep import FINISHED, RECORD, read_json, recorded_state

PAPER_RESULTS = Path(__file__).resolve().parents[1] / "configs" / "paper_results.yaml"
# (results.json section, key, column name): the headline metrics of the tasks; a column's name
# is also its key in the paper's row (configs/paper_results.yaml).
METRICS = (
    ("panoptic", "PQ", "PQ"),
    ("semantic", "mIoU", "mIoU"),
    ("instance", "AP", "AP"),
    ("vis", "AP", "AP"),
    ("vps", "VPQ", "VPQ"),
    ("vss", "mIoU", "mIoU"),
)
MANIFEST = "report.json"  # what a report wrote into its folder, and which runs it read
# Never searched for runs: a run's own subfolders (periodic evaluations, checkpoint series,
# task files, logs).
NOT_RUNS = {"evaluations", "checkpoint_series", "panoptic", "semantic", "instance", "tensorboard"}
# Run colours: a group's colour comes from a hash of its name into this palette (the first
# free one in its hash order), so that a run keeps its colour from one report to the next.
# Matplotlib's ten, without the grey of the paper's points, then darker ones once those
# are taken (a report of more than nine groups).
PALETTE = (
    "#1f77b4",  # blue
    "#ff7f0e",  # orange
    "#2ca02c",  # green
    "#d62728",  # red
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#bcbd22",  # olive
    "#17becf",  # cyan
)
MORE_COLORS = ("#393b79", "#637939", "#b8860b", "#843c39", "#7b4173", "#000000")
SEED_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


class ReportError(ValueError):
    """A user error of the report (a folder, file or key it names); tools/report.py prints it
    as one `error:` line."""


@dataclass
class RunRecord:
    name: str  # the run (with its seed), as the sweep named it, or its folder's name
    run: str  # the run without its seed: with the sweep, the group averaged over seeds
    folder: Path
    sweep: str = ""  # "" for a plain training run
    seed: int | None = None
    state: str = "done"  # recorded_state's, or "set aside"
    detail: str = ""
    results: dict = field(default_factory=dict)  # results.json of a done run only
    curve: list[dict] = field(default_factory=list)  # metrics.jsonl's records
    paper: dict = field(default_factory=dict)
    benchmark: dict = field(default_factory=dict)
    evaluates: str | None = None  # an `evaluate:` run: the run whose checkpoint it scored
    iteration: int | None = None  # of the checkpoint its results are of (finished.json)

    @property
    def group(self) -> str:
        """The table's row: `<sweep>/<run>` (a plain run: its folder's name)."""
        return f"{self.sweep}/{self.run}" if self.sweep else self.run

    @property
    def full_name(self) -> str:
        """`<sweep>/<run>-seed<k>` (a plain run: its folder's name)."""
        return f"{self.sweep}/{self.name}" if self.sweep else self.name

    @property
    def counted(self) -> bool:
        return self.state == "done"

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
        raise ReportError(f"{path}: no row '{key}' (tables: {sorted(values)})")
    return values[table][row]


def is_plain_run(folder: Path) -> bool:
    """A training run's output_dir (results.json and config.yaml), not a sweep's, nor one
    checkpoint's evaluation in a run's checkpoint_series/."""
    return (
        (folder / "results.json").is_file()
        and (folder / "config.yaml").is_file()
        and folder.resolve().parent.name not in NOT_RUNS
    )


def find_runs(folders: list[str | Path]) -> list[Path]:
    """The run folders of the report, sorted: the sweeps' runs (run.json) in or under
    `folders`, and those of `folders` that are themselves plain training runs."""
    found = set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ReportError(f"no such folder: {folder}")
        if (folder / RECORD).is_file() or is_plain_run(folder):
            found.add(folder)
            continue
        for parent, subfolders, files in os.walk(folder):
            if RECORD in files:
                found.add(Path(parent))
                subfolders.clear()  # a run's own folders hold no runs
            else:
                subfolders[:] = sorted(name for name in subfolders if name not in NOT_RUNS)
    if not found:
        raise ReportError(
            f"no run to report in {', '.join(map(str, folders))}: a sweep's run folders hold "
            f"{RECORD} (tools/sweep.py), a training run's folder given itself holds "
            "results.json and config.yaml"
        )
    return sorted(found)


def read_run(folder: Path) -> RunRecord:
    """One run: its sweep, run and seed (run.json), its state, and, when it is done, its
    results, metrics.jsonl records and paper row."""
    folder = Path(folder)
    meta = read_json(folder / RECORD) or {}
    name = meta.get("name", folder.name)
    sweep = meta.get("sweep") or (folder.parent.name if meta else "")
    record = RunRecord(
        name=name,
        run=meta.get("group") or name,
        folder=folder,
        sweep=sweep,
        seed=meta.get("seed"),
        evaluates=(meta.get("evaluated") or {}).get("run"),
    )
    state = recorded_state(folder)
    record.state, record.detail = state.state, state.detail
    if meta and name != folder.name:  # tools/sweep.py moves a stale run aside, renamed
        record.state = "set aside"
        record.detail = f"the folder of run {name}, renamed (a stale run the sweep kept)"
    elif state.state == "new":
        record.detail = f"no {FINISHED}: it did not finish"
    if not record.counted:
        return record
    results_file = folder / "results.json"
    if not results_file.is_file():
        record.state, record.detail = "incomplete", f"{FINISHED} but no results.json"
        return record
    record.results = _read_json_lines(results_file, whole=True)[0][1]
    record.iteration = (read_json(folder / FINISHED) or {}).get("iteration")
    if (folder / "metrics.jsonl").is_file():
        record.curve = [line for _, line in _read_json_lines(folder / "metrics.jsonl")]
    try:
        record.paper = paper_row(meta.get("paper"))
    except ReportError:
        raise ReportError(
            f"{folder / RECORD}: paper row '{meta['paper']}' is not in {PAPER_RESULTS}"
        ) from None
    return record


def _read_json_lines(path: Path, whole: bool = False) -> list[tuple[int, dict]]:
    """The JSON objects of a file of JSON lines with their line numbers (`whole`: the one
    object of a JSON file); an error names the file and line of one that is not JSON."""
    text = path.read_text()
    chunks = [(1, text)] if whole else enumerate(text.splitlines(), 1)
    records = []
    for number, chunk in chunks:
        if chunk.strip():
            try:
                records.append((number, json.loads(chunk)))
            except json.JSONDecodeError as error:
                where = path if whole else f"{path}:{number}"
                raise ReportError(f"{where}: not JSON ({error})") from None
    return records


def read_benchmarks(paths: list[str | Path]) -> dict[str, dict]:
    """tools/benchmark.py JSON lines by the run (or group) their "run" key names."""
    lines = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ReportError(f"benchmark file not found: {path}")
        for number, record in _read_json_lines(path):
            if "run" not in record:
                raise ReportError(f"{path}:{number}: no 'run' key naming the run it measured")
            lines[record["run"]] = record
    return lines


def attach_benchmarks(runs: list[RunRecord], benchmarks: dict[str, dict]) -> list[str]:
    """Each run's benchmark line: the one named by its group (`<sweep>/<run>`), else by its
    run, else by its own name. Returns the lines' names that matched no run."""
    used = set()
    for run in runs:
        for key in (run.group, run.run, run.name):
            if key in benchmarks:
                run.benchmark = benchmarks[key]
                used.add(key)
                break
    return [key for key in benchmarks if key not in used]


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


def groups_of(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """The counted runs by group, groups in the order of their first run."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        if run.counted:
            groups.setdefault(run.group, []).append(run)
    return groups


def table(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """One row per group, done runs only (the seeds of a run averaged, ± their standard
    deviation): each headline metric, the paper's value beside it, params, GFLOPs and FPS
    where measured."""
    groups = groups_of(runs)
    counted = [run for members in groups.values() for run in members]
    present = [m for m in METRICS if any(r.metric(m[0], m[1]) is not None for r in counted)]
    header = ["Sweep", "Run", "Seeds"]
    for _, _, column in present:
        header += [column, f"{column} paper"]
    # Per query block, where masked attention was on at evaluation (test.block_metrics).
    blocks = [
        (f"{section}_block{i}", key, f"{column} block {i}")
        for section, key, column in present
        for i in range(_block_count(counted, section))
    ]
    header += [column for _, _, column in blocks]
    header += ["Params (M)", "GFLOPs", "FPS"]
    rows = []
    for members in groups.values():
        first = members[0]
        row = [first.sweep or "-", first.run, str(len(members))]
        for section, key, column in present:
            values = [v for r in members if (v := r.metric(section, key)) is not None]
            row += [_mean_spread(values), str(first.paper.get(column, "-"))]
        for section, key, _ in blocks:
            row.append(
                _mean_spread([v for r in members if (v := r.metric(section, key)) is not None])
            )
        bench = first.benchmark
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


def not_counted_lines(runs: list[RunRecord]) -> list[str]:
    """One line per run left out of the table: its name, state and why, and its folder."""
    return [
        f"- {run.full_name}: {run.state} ({run.detail}), {run.folder}"
        for run in runs
        if not run.counted
    ]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


# -- names and colours of the groups in pictures ------------------------------------------------


def group_labels(runs: list[RunRecord]) -> dict[str, str]:
    """How pictures name each group: its run's name when the report holds one sweep (and no
    two groups share a run name), else `<sweep>/<run>`."""
    groups = list(dict.fromkeys(run.group for run in runs))
    by_group = {run.group: run for run in runs}
    short = {group: by_group[group].run for group in groups}
    if len({by_group[g].sweep for g in groups}) <= 1 and len(set(short.values())) == len(groups):
        return short
    return {group: group for group in groups}


def common_sweep(runs: list[RunRecord]) -> str:
    """The one sweep of every run, else ''."""
    sweeps = {run.sweep for run in runs}
    return sweeps.pop() if len(sweeps) == 1 else ""


def group_colors(groups) -> dict[str, str]:
    """A colour per group from a SHA-256 of its name into PALETTE: the first in the name's
    own order of the palette (then of MORE_COLORS) that no group before it (by name) took. A
    group keeps its colour in every report unless two of one report's groups hash to the same
    colour."""
    colors, taken = {}, set()
    for group in sorted(set(groups)):
        order = [
            color
            for palette in (PALETTE, MORE_COLORS)
            for color in sorted(
                palette, key=lambda c: hashlib.sha256(f"{group}\0{c}".encode()).digest()
            )
        ]
        colors[group] = next((c for c in order if c not in taken), order[0])
        taken.add(colors[group])
    return colors


def file_stem(label: str) -> str:
    """A group's label as part of a file name (`<sweep>/<run>` as `<sweep>--<run>`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace("/", "--"))


def seed_marker(run: RunRecord, runs: list[RunRecord]) -> str:
    """The marker of a run's seed (a run without one: the next), the same in every picture."""
    seeds = sorted({r.seed for r in runs if r.seed is not None})
    index = seeds.index(run.seed) if run.seed in seeds else len(seeds)
    return SEED_MARKERS[index % len(SEED_MARKERS)]


def seed_name(seed) -> str:
    return "no seed" if seed is None else f"seed {seed}"


def evaluated_label(run: RunRecord, runs: list[RunRecord], labels: dict[str, str]) -> str:
    """The group an `evaluate:` run scored the checkpoint of, as the pictures name it."""
    for other in runs:
        if other.name == run.evaluates and other.sweep == run.sweep:
            return labels.get(other.group, other.run)
    return re.sub(r"-seed\d+$", "", run.evaluates or "")


# -- pictures (matplotlib's Agg canvas, imported when drawing) ----------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    figure.savefig(path)
    return Path(path)


def plain_log_ticks(axes, axis: str = "y") -> None:
    """Log-scale ticks labelled as plain numbers (2, 3, 5, 10 rather than 2×10⁰), enough of
    them to read a range of less than a decade, and no labelled minor ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    low, high = axes.get_ylim() if axis == "y" else axes.get_xlim()
    decades = math.log10(high / low)
    mantissas = (1, 2, 3, 4, 5, 6, 7, 8, 9) if decades < 1.3 else (1, 2, 5)
    if decades > 3:
        mantissas = (1,)
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    ticks = [m * 10.0**e for e in exponents for m in mantissas]
    ticks = [t for t in ticks if low <= t <= high]
    target = axes.yaxis if axis == "y" else axes.xaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


def per_prediction_loss(record: dict) -> float:
    """A logged loss divided by the number of predictions it sums (`loss_class_<i>` keys):
    masked attention supervises one prediction per query block besides the final one, so
    runs with and without it compare on this, not on the sum."""
    predictions = sum(key.startswith("loss_class_") for key in record) or 1
    return record["loss"] / predictions


def present_metrics(runs: list[RunRecord]) -> list[tuple[str, str, str]]:
    return [m for m in METRICS if any(r.metric(m[0], m[1]) is not None for r in runs)]


def _title(text: str, runs: list[RunRecord]) -> str:
    sweep = common_sweep(runs)
    return f"{sweep}: {text}" if sweep else text


def draw_loss(runs: list[RunRecord], path: Path) -> Path:
    """The training loss per supervised prediction against the iteration, one colour per
    group: each seed a thin line, the mean of the seeds a thick one, which the legend names;
    runs that only evaluate another run's checkpoint are named below it."""
    runs = [run for run in runs if run.counted]
    colors, labels = group_colors(r.group for r in runs), group_labels(runs)
    figure = _figure(7.5, 4.5)
    axes = figure.add_subplot()
    labelled, several = set(), False
    for group, members in groups_of(runs).items():
        curves = [
            {r["iteration"]: per_prediction_loss(r) for r in run.curve if r.get("loss") is not None}
            for run in members
        ]
        curves = [curve for curve in curves if curve]
        if not curves:
            continue
        labelled.add(group)
        if len(curves) == 1:
            axes.plot(*zip(*sorted(curves[0].items())), color=colors[group], label=labels[group])
            continue
        several = True
        for curve in curves:
            axes.plot(*zip(*sorted(curve.items())), color=colors[group], alpha=0.3, linewidth=0.8)
        shared = sorted(set.intersection(*(set(curve) for curve in curves)))
        means = [statistics.fmean(curve[i] for curve in curves) for i in shared]
        label = f"{labels[group]} (mean of {len(curves)} seeds)"
        axes.plot(shared, means, color=colors[group], linewidth=2.2, label=label)
    untrained = {
        labels[run.group]: run.evaluates and evaluated_label(run, runs, labels)
        for run in runs
        if run.group not in labelled
    }
    if labelled:
        axes.set_yscale("log")
        plain_log_ticks(axes)
        axes.legend(
            title="run (thin lines: each seed)" if several else "run",
            fontsize=8,
            title_fontsize=8,
        )
    axes.set_xlabel("iteration")
    axes.set_ylabel("training loss per supervised prediction (log)")
    axes.grid(alpha=0.3, which="both")
    axes.set_title(_title("training loss", runs))
    if untrained:
        text = "; ".join(
            f"{label}: no training (evaluates {evaluated}'s checkpoint)"
            if evaluated
            else f"{label}: no training logged"
            for label, evaluated in untrained.items()
        )
        figure.text(0.01, 0.005, text, fontsize=7.5, color="0.3", va="bottom")
        figure.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    return _save(figure, path)


def draw_evaluation(runs: list[RunRecord], path: Path) -> Path:
    """The final evaluation of every run, one panel per metric: a dot per seed (its own
    marker, jittered) on the row of its group, labelled with the group's name, and the mean ±
    standard deviation of the seeds beside them (a dot chart: one evaluation per run is a
    number, not a line). `evaluate:` groups have their row in every panel they have values of."""
    from matplotlib.lines import Line2D

    groups = groups_of(runs)
    counted = [run for members in groups.values() for run in members]
    metrics = present_metrics(counted)
    colors, labels = group_colors(groups), group_labels(counted)
    names = list(groups)[::-1]  # the table's first row at the top
    ticks = [
        labels[g] + f"\n(evaluates {evaluated_label(groups[g][0], runs, labels)})"
        if groups[g][0].evaluates
        else labels[g]
        for g in names
    ]
    figure = _figure(1.6 + 3.3 * max(1, len(metrics)), 1.4 + 0.75 * len(names))
    panels = figure.subplots(1, max(1, len(metrics)), sharey=True, squeeze=False)[0]
    seeds = sorted({run.seed for run in counted}, key=lambda s: (s is None, s))
    offsets = np.linspace(-0.22, 0.22, len(seeds)) if len(seeds) > 1 else np.zeros(1)
    for axes, (section, key, column) in zip(panels, metrics):
        for row, group in enumerate(names):
            values = []
            for run in groups[group]:
                value = run.metric(section, key)
                if value is None:
                    continue
                values.append(value)
                axes.scatter(
                    value,
                    row + offsets[seeds.index(run.seed)],
                    marker=seed_marker(run, counted),
                    s=36,
                    color=colors[group],
                    edgecolors="black",
                    linewidths=0.5,
                    zorder=3,
                )
            if len(values) > 1:
                mean, spread = statistics.fmean(values), statistics.stdev(values)
                axes.errorbar(
                    mean, row + 0.38, xerr=spread, fmt="|", color="black", ms=10, capsize=3
                )
                axes.annotate(
                    f"{mean:.1f} ± {spread:.1f}",
                    (mean, row + 0.38),
                    xytext=(0, 5),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
            elif values:
                axes.annotate(
                    f"{values[0]:.1f}",
                    (values[0], row),
                    xytext=(0, 7),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
        axes.set_xlabel(f"{column} (%)")
        axes.set_title(column)
        axes.grid(axis="x", alpha=0.3)
        low, high = axes.get_xlim()
        axes.set_xlim(low - 0.08 * (high - low), high + 0.08 * (high - low))
    panels[0].set_yticks(range(len(names)), ticks, fontsize=8)
    panels[0].set_ylim(-0.6, len(names) - 0.3)
    for tick, group in zip(panels[0].get_yticklabels(), names):
        tick.set_color(colors[group])
    handles, legend = [], []
    if seeds != [None]:  # which marker is which seed
        by_seed = {run.seed: run for run in counted}
        handles = [
            Line2D([], [], linestyle="", marker=seed_marker(by_seed[s], counted), color="0.55")
            for s in seeds
        ]
        legend = [seed_name(seed) for seed in seeds]
    if any(len(members) > 1 for members in groups.values()):
        handles.append(Line2D([], [], linestyle="-", marker="|", color="black", ms=10))
        legend.append("mean ± std of the seeds")
    if legend:
        figure.legend(handles, legend, loc="outside lower center", ncols=len(legend), fontsize=8)
    figure.suptitle(_title("final evaluation of each run", counted), fontsize=11)
    return _save(figure, path)


def evaluations_of(run: RunRecord) -> dict[str, list[tuple[int, float]]]:
    """The evaluations metrics.jsonl logged for `run`: {metric key: [(iteration, value)]}.
    An `evaluate:` run's single evaluation is placed at the iteration it scored."""
    points: dict[str, list[tuple[int, float]]] = {}
    for section, key, _ in METRICS:
        name = f"{section}/{key}"
        for record in run.curve:
            if record.get(name) is not None:
                iteration = record["iteration"]
                if run.evaluates is not None and run.iteration is not None:
                    iteration = run.iteration
                points.setdefault(name, []).append((iteration, record[name]))
    return points


def several_evaluations(runs: list[RunRecord]) -> bool:
    """Whether some counted run logged more than one evaluation of a metric (periodic
    evaluations): only then are evaluation curves drawn."""
    return any(
        len(points) > 1 for run in runs if run.counted for points in evaluations_of(run).values()
    )


def draw_evaluation_curves(runs: list[RunRecord], path: Path) -> Path:
    """The periodic evaluations against the iteration, one panel per metric: a line per run
    (its group's colour, its seed's marker); a run evaluated once is a single marker at its
    iteration. Legends name the groups and the seeds."""
    from matplotlib.lines import Line2D

    runs = [run for run in runs if run.counted]
    colors, labels = group_colors(r.group for r in runs), group_labels(runs)
    logged = {name for run in runs for name in evaluations_of(run)}
    metrics = [m for m in METRICS if f"{m[0]}/{m[1]}" in logged]
    figure = _figure(1.0 + 4.2 * max(1, len(metrics)), 4.2)
    panels = figure.subplots(1, max(1, len(metrics)), squeeze=False)[0]
    for axes, (section, key, column) in zip(panels, metrics):
        for run in runs:
            points = sorted(evaluations_of(run).get(f"{section}/{key}", []))
            if points:
                axes.plot(
                    *zip(*points),
                    marker=seed_marker(run, runs),
                    linestyle="-" if len(points) > 1 else "",
                    color=colors[run.group],
                    mec="black",
                    mew=0.5,
                    alpha=0.85,
                )
        axes.set(xlabel="iteration", ylabel=f"{column} (%)", title=column)
        axes.grid(alpha=0.3)
    groups = list(dict.fromkeys(run.group for run in runs))
    handles = [Line2D([], [], color=colors[g], linewidth=3) for g in groups]
    names = [labels[g] for g in groups]
    seeds = sorted({run.seed for run in runs}, key=lambda s: (s is None, s))
    if len(seeds) > 1:
        by_seed = {run.seed: run for run in runs}
        handles += [
            Line2D([], [], linestyle="", marker=seed_marker(by_seed[s], runs), color="0.55")
            for s in seeds
        ]
        names += [seed_name(s) for s in seeds]
    figure.legend(handles, names, loc="outside right center", fontsize=8)
    figure.suptitle(_title("evaluations during training", runs), fontsize=11)
    return _save(figure, path)


def class_names(run: RunRecord) -> list[str]:
    """The class names of the run's semantic evaluation (its per_class.csv)."""
    per_class = run.folder / "semantic" / "per_class.csv"
    if per_class.is_file():
        with open(per_class) as file:
            return [row["class"] for row in csv.DictReader(file)]
    count = len(run.results["semantic"]["confusion_matrix"])
    return [str(i) for i in range(count)]


def draw_confusion(runs: list[RunRecord], path: Path, label: str | None = None) -> Path:
    """The mIoU confusion matrix of a group, its seeds' pixels summed, each row in percent of
    its ground-truth pixels; the colour bar in the same percent, 0 to 100."""
    runs = [run for run in runs if "confusion_matrix" in run.results.get("semantic", {})]
    matrix = sum(np.array(r.results["semantic"]["confusion_matrix"], np.float64) for r in runs)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = 100 * np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    names = class_names(runs[0])
    size = 1.5 + 0.5 * len(names)
    figure = _figure(size + 1.8, size + 0.6)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=100)
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(range(len(names)), names, fontsize=8)
    if len(names) <= 30:
        for i, j in np.ndindex(shares.shape):
            if totals[i, 0] > 0:
                color = "white" if shares[i, j] > 50 else "black"
                text = f"{shares[i, j]:.0f}"
                axes.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
    seeds = f"{len(runs)} seeds' pixels" if len(runs) > 1 else "one run"
    axes.set(
        xlabel="predicted class",
        ylabel="ground-truth class",
        title=f"{label or runs[0].group}: % of each ground-truth row ({seeds})",
    )
    axes.title.set_fontsize(10)
    bar = figure.colorbar(image, ax=axes, fraction=0.046)
    bar.set_label("% of the ground-truth class's pixels")
    return _save(figure, path)


def draw_per_class(runs: list[RunRecord], path: Path) -> Path:
    """Per-class IoU: a bar per group (the mean of its seeds, their standard deviation as an
    error bar); a class no image holds has no bar."""
    groups = {
        group: [r for r in members if "per_class_iou" in r.results.get("semantic", {})]
        for group, members in groups_of(runs).items()
    }
    groups = {group: members for group, members in groups.items() if members}
    counted = [run for members in groups.values() for run in members]
    colors, labels = group_colors(groups), group_labels(counted)
    names = class_names(counted[0])
    width = 0.8 / len(groups)
    figure = _figure(max(6.5, 0.9 + 0.28 * len(names) * len(groups)), 4.6)
    axes = figure.add_subplot()
    absent = np.ones(len(names), bool)
    for index, (group, members) in enumerate(groups.items()):
        ious = np.array(
            [
                [np.nan if v is None else v for v in r.results["semantic"]["per_class_iou"]]
                for r in members
            ],
            np.float64,
        )
        present = ~np.isnan(ious).all(axis=0)
        absent &= ~present
        filled = np.where(np.isnan(ious), 0, ious)
        counts = (~np.isnan(ious)).sum(axis=0)
        means = np.where(present, filled.sum(axis=0) / np.maximum(counts, 1), np.nan)
        spreads = np.array(
            [np.nanstd(column, ddof=1) if n > 1 else 0 for column, n in zip(ious.T, counts)]
        )
        seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
        axes.bar(
            np.arange(len(names)) + (index - (len(groups) - 1) / 2) * width,
            means,
            width,
            yerr=spreads if len(members) > 1 else None,
            capsize=2,
            color=colors[group],
            label=labels[group] + seeds,
        )
    ticks = [f"{n}\n(no pixels)" if gone else n for n, gone in zip(names, absent)]
    axes.set_xticks(np.arange(len(names)), ticks, rotation=30, ha="right")
    axes.set(ylabel="IoU (%)", ylim=(0, 105), title=_title("per-class IoU", counted))
    axes.grid(axis="y", alpha=0.3)
    figure.legend(
        title="run, mean ± std" if len(counted) > len(groups) else "run",
        loc="outside right upper",
        fontsize=8,
        title_fontsize=8,
    )
    return _save(figure, path)


def speed_points(runs: list[RunRecord], metric: str = "PQ") -> tuple[str, list, list]:
    """The points of `draw_accuracy_vs_speed`: the speed key ("fps", or "gflops" where no FPS
    was measured), ours as (group, speed, mean metric) and the paper's as (group, speed,
    metric). The paper's FPS are GPU figures: none of them beside FPS measured on a CPU."""
    section = {"PQ": "panoptic", "mIoU": "semantic", "AP": "instance"}[metric]
    groups = groups_of(runs)
    counted = [run for members in groups.values() for run in members]
    speed_key = "fps" if any(r.benchmark.get("fps") for r in counted) else "gflops"
    on_cpu = speed_key == "fps" and any(r.benchmark.get("device") == "cpu" for r in counted)
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
    ours (the paper's Figure 1), each group in its colour, named in the legend; ours with the
    standard deviation of the seeds."""
    speed_key, ours, paper_points = speed_points(runs, metric)
    groups = groups_of(runs)
    counted = [run for members in groups.values() for run in members]
    colors, labels = group_colors(groups), group_labels(counted)
    section = {"PQ": "panoptic", "mIoU": "semantic", "AP": "instance"}[metric]
    figure = _figure(8.0, 4.5)
    axes = figure.add_subplot()
    for group, speed, value in paper_points:
        axes.scatter(
            speed,
            value,
            marker="s",
            s=50,
            facecolors="none",
            edgecolors=colors[group],
            label=f"{labels[group]} (paper)",
        )
    for group, speed, value in ours:
        values = [v for r in groups[group] if (v := r.metric(section, metric)) is not None]
        spread = statistics.stdev(values) if len(values) > 1 else 0
        axes.errorbar(
            speed,
            value,
            yerr=spread or None,
            fmt="o",
            ms=7,
            capsize=3,
            color=colors[group],
            mec="black",
            mew=0.5,
            label=labels[group] + (f" ({len(values)} seeds)" if len(values) > 1 else ""),
        )
    axes.set(
        xlabel={"fps": "FPS", "fps (CPU)": "FPS (CPU, batch 1)", "gflops": "GFLOPs"}[speed_key],
        ylabel=f"{metric} (%)",
        title=_title(f"{metric} against {speed_key.replace('fps', 'FPS')}", counted),
    )
    axes.grid(alpha=0.3)
    note = "dots: ours, mean ± std" + (", squares: the paper's" if paper_points else "")
    figure.legend(title=note, loc="outside right upper", fontsize=8, title_fontsize=8)
    return _save(figure, path)


# -- the report folder ---------------------------------------------------------------------------


def claim_output(output: Path) -> list[str]:
    """Check that `output` may take a report: a new or empty folder, or one a report wrote
    (its report.json). Returns the files that report wrote, to be removed."""
    if output.exists() and not output.is_dir():
        raise ReportError(f"--output {output} is a file, not a folder")
    if not output.is_dir() or not any(output.iterdir()):
        return []
    manifest = read_json(output / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("tool") != "tools/report.py":
        raise ReportError(
            f"--output {output} is not empty and not a report's folder (no {MANIFEST} of "
            "tools/report.py): give a new or empty folder"
        )
    return [name for name in manifest.get("files", []) if name == Path(name).name]


def write_report(
    folders: list[str | Path], output: str | Path, benchmark_files=()
) -> tuple[list[Path], str]:
    """The table and pictures of the runs in `folders` into `output`, which is rewritten
    whole: what a previous report wrote there is removed, report.json lists what this one
    wrote. Returns the files written and the text to print (the table, the runs not counted)."""
    runs = [read_run(folder) for folder in find_runs(folders)]
    unmatched = attach_benchmarks(runs, read_benchmarks(benchmark_files))
    output = Path(output)
    old = claim_output(output)
    counted = [run for run in runs if run.counted]
    if not counted:
        states = [f"{run.full_name}: {run.state}" for run in runs]
        more = f", and {len(states) - 5} more" if len(states) > 5 else ""
        raise ReportError(
            f"nothing to report in {', '.join(map(str, folders))}: no run is done "
            f"({'; '.join(states[:5])}{more})"
        )
    header, rows = table(runs)
    text = markdown(header, rows)
    skipped = not_counted_lines(runs)
    if skipped:
        text += "\n\nNot counted (not done):\n" + "\n".join(skipped)
    if unmatched:
        text += "\n\nBenchmark lines matching no run: " + ", ".join(unmatched)
    try:
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".report-", dir=output))
    except OSError as error:
        raise ReportError(f"cannot write into {output}: {error.strerror or error}") from None
    try:
        drawn = _draw_all(runs, staging, header, rows, text)
        for name in old:  # what the previous report wrote: no stale picture stays
            (output / name).unlink(missing_ok=True)
        written = []
        for path in drawn:
            os.replace(path, output / path.name)
            written.append(output / path.name)
        manifest = {
            "tool": "tools/report.py",
            "folders": [str(folder) for folder in folders],
            "files": [path.name for path in written] + [MANIFEST],
            "runs": [
                {
                    "sweep": run.sweep,
                    "run": run.run,
                    "name": run.name,
                    "seed": run.seed,
                    "folder": str(run.folder),
                    "state": run.state,
                    "counted": run.counted,
                    "detail": run.detail,
                }
                for run in runs
            ],
        }
        (output / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [*written, output / MANIFEST], text


def _draw_all(runs, folder: Path, header, rows, text: str) -> list[Path]:
    (folder / "report.md").write_text(text + "\n")
    write_csv(folder / "report.csv", header, rows)
    written = [folder / "report.md", folder / "report.csv"]
    counted = [run for run in runs if run.counted]
    if any(r.get("loss") is not None for run in counted for r in run.curve):
        written.append(draw_loss(runs, folder / "training_loss.png"))
    written.append(draw_evaluation(runs, folder / "evaluation.png"))
    if several_evaluations(runs):
        written.append(draw_evaluation_curves(runs, folder / "evaluation_curves.png"))
    labels = group_labels(counted)
    semantic = {
        group: members
        for group, members in groups_of(runs).items()
        if any("confusion_matrix" in r.results.get("semantic", {}) for r in members)
    }
    for group, members in semantic.items():
        path = folder / f"confusion_{file_stem(labels[group])}.png"
        written.append(draw_confusion(members, path, labels[group]))
    if any("per_class_iou" in r.results.get("semantic", {}) for r in counted):
        written.append(draw_per_class(runs, folder / "per_class_iou.png"))
    if speed_points(runs)[1]:  # a run of ours with PQ and a measured speed to place
        written.append(draw_accuracy_vs_speed(runs, folder / "accuracy_vs_speed.png"))
    return written
