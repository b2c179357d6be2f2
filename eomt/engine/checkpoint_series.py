"""The checkpoints of a training run evaluated one after another, and their metrics drawn
against the iteration (`tools/evaluate_checkpoints.py`).

A run folder is a trainer's output_dir: its `config.yaml` and its checkpoints
`model_NNNNNNN.pth`. Each checkpoint is evaluated by the trainer's own evaluation
(`Trainer.test`) with the run's config (and any overrides), its weights loaded by
`eomt.weights.load_checkpoint`. Its results (`results.json` and the tasks' files, pictures with
`test.num_vis`) go to `<run>/checkpoint_series/<checkpoint name>/`, its scalar metrics, named
as in metrics.jsonl, to one line of `<run>/checkpoint_series.jsonl`, which is rewritten whole
(atomically) after each checkpoint: an interrupted series keeps every checkpoint it finished,
and a checkpoint already in the file (with metrics of every task of test.metrics) is not
evaluated again. The headline metrics against the iteration are drawn into
`<run>/checkpoint_series.png`.
"""

import json
import os
from pathlib import Path

from eomt.config import get_cfg
from eomt.engine.checkpoint import checkpoint_iteration, checkpoints_newest_first
from eomt.engine.trainer import Trainer, _scalar_metrics
from eomt.tasks import TASKS
from eomt.weights import load_checkpoint

SERIES_FILE = "checkpoint_series.jsonl"
PLOT_FILE = "checkpoint_series.png"
RESULTS_DIR = "checkpoint_series"  # one folder per checkpoint, its results.json and files


def select_checkpoints(checkpoints: list[Path], every: int = 1) -> list[Path]:
    """Every `every`-th of the checkpoints (oldest first) from the first, and the last."""
    if every < 1:
        raise ValueError(f"--every must be at least 1; got {every}")
    chosen = list(checkpoints[::every])
    if checkpoints and checkpoints[-1] not in chosen:
        chosen.append(checkpoints[-1])
    return chosen


def read_series(path: Path) -> list[dict]:
    """The records of a checkpoint_series.jsonl, or none if there is no such file."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["iteration"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path}, line {number}: not a record of a checkpoint ({error}); "
                "move the file away to evaluate the checkpoints again"
            ) from error
        records.append(record)
    return records


def write_series(path: Path, records) -> None:
    """All records, by iteration, written to a temporary file and renamed over `path`."""
    ordered = sorted(records, key=lambda record: record["iteration"])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in ordered))
    os.replace(tmp, path)


def run_checkpoints(run: Path) -> list[Path]:
    """The checkpoints of a run folder, oldest first; a clear error for a folder that is not
    a run's or holds none."""
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{run} has no config.yaml: not the output_dir of a training run "
            "(tools/train_net.py writes its config there)"
        )
    checkpoints = sorted(checkpoints_newest_first(run))
    if not checkpoints:
        raise FileNotFoundError(f"{run} holds no checkpoint (model_NNNNNNN.pth) to evaluate")
    return checkpoints


def evaluate_series(run, every: int = 1, overrides=(), plot: bool = True) -> list[dict]:
    """Evaluate the checkpoints of `run` (every `every`-th, and the last) that its
    checkpoint_series.jsonl does not hold yet; return all its records, by iteration, and
    draw them (`plot`). `overrides`: "key=value" strings on top of the run's config.yaml."""
    run = Path(run)
    checkpoints = select_checkpoints(run_checkpoints(run), every)
    series_file = run / SERIES_FILE
    records = {record["iteration"]: record for record in read_series(series_file)}
    cfg = get_cfg(run / "config.yaml", list(overrides))
    todo = [
        path
        for path in checkpoints
        if not _has_metrics(records.get(checkpoint_iteration(path)), cfg.test.metrics)
    ]
    if todo:
        # The model is built from the first checkpoint to evaluate: no backbone weights are
        # fetched, and a checkpoint of another architecture stops here with its mismatches.
        cfg.model.weights = str(todo[0])
        cfg.model.weights_strict = True
        cfg.output_dir = str(run / RESULTS_DIR / todo[0].stem)
        trainer = Trainer(cfg)
        for index, path in enumerate(todo):
            if index:
                load_checkpoint(trainer.model, path)
            trainer.iteration = checkpoint_iteration(path)
            trainer.output_dir = run / RESULTS_DIR / path.stem
            print(f"{path.name}:", flush=True)
            results = trainer.test()
            record = {"iteration": trainer.iteration, "checkpoint": path.name}
            records[trainer.iteration] = record | _scalar_metrics(results)
            write_series(series_file, records.values())
    series = sorted(records.values(), key=lambda record: record["iteration"])
    if plot:
        plot_series(series, run / PLOT_FILE, title=run.name)
    return series


def _has_metrics(record: dict | None, tasks) -> bool:
    """Whether a checkpoint's record holds metrics of every task of `tasks` (test.metrics): a
    checkpoint evaluated before without one of them is evaluated again, its record replaced."""
    return record is not None and all(any(k.startswith(f"{t}/") for k in record) for t in tasks)


def headline_keys(series: list[dict]) -> list[str]:
    """The metrics.jsonl names of the tasks' first headline metrics found in `series`
    (panoptic/PQ, semantic/mIoU, instance/AP)."""
    keys = [f"{name}/{task.headline[0]}" for name, task in TASKS.items()]
    return [key for key in keys if any(key in record for record in series)]


def format_series(series: list[dict]) -> str:
    """A table: one row per checkpoint, its iteration and headline metrics."""
    keys = headline_keys(series)
    rows = [["iteration", *keys]] + [
        [str(r["iteration"]), *(f"{r[k]:.2f}" if k in r else "-" for k in keys)] for r in series
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def plot_series(series: list[dict], path: Path, title: str = "") -> Path:
    """The headline metrics against the iteration, one line each, as a PNG (Agg), written
    to a temporary file and renamed over `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key in headline_keys(series):
        points = [(r["iteration"], r[key]) for r in series if key in r]
        axes.plot(*zip(*points), marker="o", label=key)
    axes.set_xlabel("iteration")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("metric (%)")
    axes.set_title(f"{title}: checkpoints" if title else "checkpoints")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
