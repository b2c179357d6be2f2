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
evaluated without" row. `paper` names a row of configs/paper_results.yaml (tools/report.py).
"""

import itertools
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

SWEEP_KEYS = {"name", "config", "overrides", "seeds", "runs", "product"}
RUN_KEYS = {"config", "overrides", "paper", "evaluate"}


@dataclass
class Run:
    name: str
    config: str
    overrides: list[str]
    output_dir: Path
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


def final_checkpoint(output_dir: Path) -> Path:
    """The run's last checkpoint, as its `last_checkpoint` file names it."""
    pointer = Path(output_dir) / "last_checkpoint"
    if not pointer.is_file():
        raise FileNotFoundError(f"{output_dir}: no last_checkpoint (the run has not trained)")
    return Path(output_dir) / pointer.read_text().strip()


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
    folder = Path(output_root) / sweep.get("name", path.stem)
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
    state: str  # done | interrupted | failed | new
    detail: str = ""
    log_tail: list[str] = field(default_factory=list)


def run_state(run: Run) -> RunState:
    """done: results.json is there; interrupted: checkpoints but no results; failed: the log
    of the last attempt ends in an error; new: nothing yet."""
    folder = run.output_dir
    if (folder / "results.json").is_file():
        return RunState("done")
    log = folder / "log.txt"
    failed = folder / "FAILED"
    if failed.is_file():
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        return RunState("failed", failed.read_text().strip(), lines[-20:])
    if any(folder.glob("model_*.pth")):
        return RunState("interrupted")
    return RunState("new")


def execute(run: Run, python: str, cwd: str | Path, num_gpus: int = 1, env=None) -> int:
    """Run (or resume, when it has checkpoints) one run, its output appended to log.txt;
    a failure leaves FAILED with the exit status beside it."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    (run.output_dir / "FAILED").unlink(missing_ok=True)
    # What tools/report.py needs to group the seeds and set the paper's row beside them.
    meta = {"name": run.name, "group": run.group, "seed": run.seed, "paper": run.paper}
    (run.output_dir / "run.json").write_text(json.dumps(meta) + "\n")
    resume = any(run.output_dir.glob("model_*.pth")) and run.evaluates is None
    command = run.command(python, resume=resume, num_gpus=num_gpus)
    with open(run.output_dir / "log.txt", "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        code = subprocess.run(
            command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env
        ).returncode
    if code != 0:
        (run.output_dir / "FAILED").write_text(f"exit status {code}\n")
    return code
