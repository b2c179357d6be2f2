"""Sweeps: a YAML file that expands into named runs of tools/train_net.py, and their states.

    name: table4_annealing             # runs go to <output>/<name>/<run>
    config: configs/synthetic/eomt_tiny_panoptic.yaml
    overrides: [solver.max_iter=150]    # for every run
    seeds: [0, 1, 2]                    # each run once per seed: <run>-seed<k>
    runs:                               # named runs: overrides, or {config, overrides, paper}
      annealing: [model.masked_attn=anneal]
      masking: {overrides: [model.masked_attn=always], paper: table4.masking_masking}
      masking_eval_unmasked: {evaluate: masking, overrides: [model.masked_attn=never]}
    product:                            # or axes multiplied out, names joined by "_"
      size: {small: [...], large: [...]}
      lr: {low: [solver.lr=1e-4], high: [solver.lr=2e-4]}

A run with `evaluate: OTHER` trains nothing: it evaluates the final checkpoint of OTHER (of the
same seed) with its own overrides (`--eval-only`), as the paper's "trained with masking,
evaluated without" row, once OTHER is done. `paper` names a row of configs/paper_results.yaml
(tools/report.py).

A run's folder records what happened to it, so that its state is true after any stop:
run.json (the runner's: the run, its command, a digest of its config and overrides, its last
attempt and how it ended, and for an `evaluate:` run what it scored), RUNNING while a process
runs it, FAILED when the trainer stopped with an error, and finished.json, which the trainer
writes last, once the final evaluation is in results.json.
"""

import itertools
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from eomt.config import config_digest, get_cfg

SWEEP_KEYS = {"name", "config", "overrides", "seeds", "runs", "product"}
RUN_KEYS = {"config", "overrides", "paper", "evaluate"}
STATES = ("new", "running", "interrupted", "failed", "stale", "waiting", "done")
RECORD, LOCK, FAILED, FINISHED = "run.json", "RUNNING", "FAILED", "finished.json"


@dataclass
class Run:
    name: str
    config: str
    overrides: list[str]
    output_dir: Path
    sweep: str = ""
    seed: int | None = None
    paper: str | None = None
    evaluates: "Run | None" = None  # the trained run whose final checkpoint this one scores
    group: str = ""  # the name without its seed: runs of one group are averaged by the report

    def command(self, python: str, resume: bool = False, num_gpus: int = 1) -> list[str]:
        """The tools/train_net.py command line of this run; on several GPUs, under torchrun
        (one process per GPU of this node)."""
        command = [python, "tools/train_net.py", "--config-file", self.config]
        if num_gpus > 1:
            torchrun = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={num_gpus}",
            ]
            command[1:1] = torchrun
        if self.evaluates is not None:
            weights = final_checkpoint(self.evaluates.output_dir)
            command += ["--eval-only", *self.overrides, f"model.weights={weights}"]
        else:
            command += ["--resume"] * resume + list(self.overrides)
        return [*command, f"output_dir={self.output_dir}"]

    def digest(self) -> str:
        """Of the config file (with its bases) and the overrides this run is given now."""
        return config_digest(self.config, [*self.overrides, f"output_dir={self.output_dir}"])

    def check_config(self) -> None:
        """Raise the ConfigError of a key or value this run's config refuses."""
        get_cfg(self.config, [*self.overrides, f"output_dir={self.output_dir}"])


def read_json(path: Path) -> dict | None:
    """A small JSON record, or None when it is missing or was cut while being written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def final_checkpoint(output_dir: Path) -> Path:
    """The checkpoint a finished training run ended with (its finished.json)."""
    finished = read_json(Path(output_dir) / FINISHED)
    if finished is None or finished.get("mode") != "train":
        raise FileNotFoundError(f"{output_dir}: the run has not finished training")
    return Path(output_dir) / finished["checkpoint"]


def _as_run_spec(name: str, spec, source: str) -> dict:
    if isinstance(spec, list):
        return {"overrides": spec}
    if not isinstance(spec, dict) or set(spec) - RUN_KEYS:
        raise ValueError(
            f"{source}: run '{name}' must be a list of overrides or a mapping of "
            f"{sorted(RUN_KEYS)}, got {spec!r}"
        )
    return spec


def load_sweep(path: str | Path, output_root: str | Path = "output/sweeps") -> list[Run]:
    """The runs of a sweep file, in order (a trained run before the runs that evaluate it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    sweep = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(sweep, dict):
        raise ValueError(f"{path}: a sweep file is a mapping of {sorted(SWEEP_KEYS)}")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ValueError(
            f"{path}: unknown keys {sorted(unknown)}; a sweep has {sorted(SWEEP_KEYS)}"
        )
    if "config" not in sweep:
        raise ValueError(f"{path}: no 'config' (the base config file of every run)")
    specs = {
        name: _as_run_spec(name, spec, str(path)) for name, spec in sweep.get("runs", {}).items()
    }
    axes = sweep.get("product", {})
    if axes:
        for labels in itertools.product(*(axis.items() for axis in axes.values())):
            name = "_".join(label for label, _ in labels)
            specs[name] = {"overrides": [o for _, overrides in labels for o in overrides]}
    if not specs:
        raise ValueError(f"{path}: no runs (give 'runs' or 'product')")
    for name, spec in specs.items():
        if spec.get("evaluate") is not None and spec["evaluate"] not in specs:
            raise ValueError(f"{path}: run '{name}' evaluates '{spec['evaluate']}', not a run")
    sweep_name = sweep.get("name", path.stem)
    folder = Path(output_root) / sweep_name
    seeds = sweep.get("seeds") or [None]
    runs: list[Run] = []
    for seed in seeds:
        by_name: dict[str, Run] = {}
        for name, spec in sorted(specs.items(), key=lambda item: "evaluate" in item[1]):
            full = name if seed is None else f"{name}-seed{seed}"
            overrides = [*sweep.get("overrides", []), *spec.get("overrides", [])]
            if seed is not None:
                overrides.append(f"seed={seed}")
            run = Run(
                name=full,
                config=spec.get("config", sweep["config"]),
                overrides=overrides,
                output_dir=folder / full,
                sweep=sweep_name,
                seed=seed,
                paper=spec.get("paper"),
                evaluates=by_name.get(spec.get("evaluate")),
                group=name,
            )
            by_name[name] = run
            runs.append(run)
    return runs


@dataclass
class RunState:
    state: str  # one of STATES
    detail: str = ""  # one line: why, or what the state stands on
    log_tail: list[str] = field(default_factory=list)


def run_state(run: Run) -> RunState:
    """What a run's folder says of it, in order of precedence:

    running      a live process holds its RUNNING lock (another host's lock counts as live);
    stale        it ran with another config or other overrides than the sweep now gives
                 it, or (`evaluate:`) its trained run finished again since it scored it;
    done         finished.json: training reached its final iteration and the final
                 evaluation is written (or the evaluation of an `evaluate:` run is);
    failed       the trainer stopped with an error (FAILED: its exit status and last error),
                 or (`evaluate:`) its trained run failed;
    waiting      an `evaluate:` run whose trained run is not done (nor failed);
    interrupted  it started (run.json, checkpoints) and stopped before the end, by a signal,
                 a kill or a lost machine: rerun, it resumes from its last checkpoint;
    new          nothing yet.
    """
    folder = run.output_dir
    recorded = recorded_state(folder)
    if recorded.state == "running":
        return recorded
    record = read_json(folder / RECORD) or {}
    started = bool(record.get("attempt")) or any(folder.glob("model_*.pth"))
    if started and record.get("digest") not in (None, run.digest()):
        return RunState("stale", "its config or overrides changed since it ran")
    if recorded.state == "done" and run.evaluates is not None:
        trained = read_json(run.evaluates.output_dir / FINISHED)
        if record.get("evaluated", {}).get("trained") != trained:
            return RunState("stale", f"{run.evaluates.name} finished again since it was scored")
    if recorded.state in ("done", "failed"):
        return recorded
    if run.evaluates is not None:
        trained = run_state(run.evaluates)
        if trained.state == "failed":
            return RunState("failed", f"{run.evaluates.name} failed: {trained.detail}")
        if trained.state != "done":
            return RunState("waiting", f"for {run.evaluates.name} ({trained.state})")
    return recorded


def recorded_state(folder: Path) -> RunState:
    """What a run's folder alone says of it, without its sweep file (so never stale nor
    waiting, which compare it with the sweep): running, done, failed, interrupted or new, as
    `run_state` tells them. tools/report.py counts a run only when it is done."""
    folder = Path(folder)
    lock = _live_lock(folder / LOCK)
    if lock:
        return RunState("running", lock)
    finished = read_json(folder / FINISHED)
    if finished is not None:
        return RunState("done", f"{finished['mode']}: {finished['checkpoint']}")
    if (folder / FAILED).is_file():
        log = folder / "log.txt"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        return RunState("failed", (folder / FAILED).read_text().strip(), lines[-20:])
    record = read_json(folder / RECORD) or {}
    if record.get("attempt") or any(folder.glob("model_*.pth")):
        return RunState("interrupted", _how_it_ended(record, folder))
    return RunState("new")


def _how_it_ended(record: dict, folder: Path) -> str:
    attempt = record.get("attempt", {})
    code = attempt.get("exit_status")
    if code is None:
        ended = "its process ended without a word (killed, or its machine lost)"
    elif code < 0:
        ended = f"killed by {signal.Signals(-code).name}"
    else:
        ended = f"exit status {code}"
    checkpoints = sorted(folder.glob("model_*.pth"))
    where = f"; resumes from {checkpoints[-1].name}" if checkpoints else "; no checkpoint yet"
    return ended + where


def _live_lock(path: Path) -> str:
    """'pid N on HOST since T' while the lock's process lives (on this host), else ''."""
    lock = read_json(path)
    if lock is None:
        return ""
    if lock["host"] == socket.gethostname():
        try:
            os.kill(lock["pid"], 0)
        except ProcessLookupError:
            return ""
        except PermissionError:
            pass  # alive, under another user
    return f"pid {lock['pid']} on {lock['host']} since {lock['since']}"


def last_error_line(log_lines: list[str]) -> str:
    """The trainer's error as it printed it: the last line naming an error, else the last."""
    for line in reversed(log_lines):
        text = line.strip()
        if text.startswith("error:") or (text.split(":")[0].endswith(("Error", "Exception"))):
            return text
    return log_lines[-1].strip() if log_lines else ""


def execute(run: Run, python: str, cwd: str | Path, num_gpus: int = 1, env=None) -> int:
    """Run (or resume, when it has checkpoints) one run, its output appended to log.txt.

    The run's record (run.json) gets its command, config digest and the attempt; a RUNNING
    lock names the process while it runs. An exit by a signal leaves the run interrupted
    (resumed by the next sweep); an error of the trainer leaves FAILED with its last error
    line. A stale run is moved aside first (`<run>.stale-<time>`), never deleted.
    """
    folder = run.output_dir
    if run_state(run).state == "stale":
        folder.rename(folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED).unlink(missing_ok=True)
    resume = any(folder.glob("model_*.pth")) and run.evaluates is None
    command = run.command(python, resume=resume, num_gpus=num_gpus)
    record = {
        "name": run.name,
        "group": run.group,
        "sweep": run.sweep,
        "seed": run.seed,
        "paper": run.paper,
        "config": run.config,
        "overrides": run.overrides,
        "digest": run.digest(),
        "command": command,
        "attempt": {"started": _now(), "host": socket.gethostname()},
    }
    if run.evaluates is not None:
        record["evaluated"] = {
            "run": run.evaluates.name,
            "trained": read_json(run.evaluates.output_dir / FINISHED),
        }
    _write_json(folder / RECORD, record)
    with open(folder / "log.txt", "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        lock = {"pid": process.pid, "host": socket.gethostname(), "since": _now()}
        _write_json(folder / LOCK, lock)
        try:
            code = process.wait()
        finally:
            (folder / LOCK).unlink(missing_ok=True)
    record["attempt"].update(ended=_now(), exit_status=code)
    _write_json(folder / RECORD, record)
    if code > 0:
        lines = (folder / "log.txt").read_text(errors="replace").splitlines()
        (folder / FAILED).write_text(f"exit status {code}: {last_error_line(lines)}\n")
    return code


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)
