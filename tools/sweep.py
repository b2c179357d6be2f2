"""Run a sweep file's runs (eomt/sweep.py describes the file and the states of runs).

    python tools/sweep.py configs/sweeps/table4_annealing_synthetic.yaml --dry-run
    python tools/sweep.py SWEEP.yaml                      # one run after another, here
    python tools/sweep.py SWEEP.yaml --gpus 4             # 4 runs at a time, one GPU each
    python tools/sweep.py SWEEP.yaml --gpus 8 --gpus-per-run 2   # 4 runs at a time, DDP on 2
    python tools/sweep.py SWEEP.yaml --slurm --partition gpu --gpus-per-run 4   # submitit

Each run writes into <output>/<sweep name>/<run>/ and its output to log.txt there. Done runs
are skipped; interrupted ones (any stop before the end: a signal, a kill, a lost machine)
resume from their last checkpoint; failed ones (the trainer's own error) are listed with that
error and run again only with --retry-failed; stale ones (their config or overrides changed
since they ran) are listed and run again, from scratch, only with --rerun-stale (the old
folder is kept beside, renamed). `evaluate:` runs start once their trained run is done; when it
failed they are failed too, and the sweep carries on. --dry-run checks every run's config and
lists each run's state, overrides and command. Then `tools/report.py` collects the results.
SLURM goes through `submitit` (pip install submitit): one job per run, requeued on a time-out
or pre-emption, the run resuming from its last checkpoint.
"""

import argparse
import os
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eomt.cli import ToolParser
from eomt.config import ConfigError
from eomt.sweep import execute, load_sweep, run_state

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("--output", default="output/sweeps", help="folder of the sweeps")
    parser.add_argument("--dry-run", action="store_true", help="check and list the runs")
    parser.add_argument("--only", nargs="+", help="run only these runs (names or groups)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    parser.add_argument(
        "--rerun-stale", action="store_true", help="run stale runs again, from scratch"
    )
    parser.add_argument(
        "--gpus", type=int, default=0, help="local GPUs to use: gpus / gpus-per-run runs at once"
    )
    parser.add_argument(
        "--gpus-per-run", type=int, default=1, help="DDP processes per run (started by torchrun)"
    )
    parser.add_argument("--slurm", action="store_true", help="submit each run with submitit")
    parser.add_argument("--partition", default="", help="SLURM partition")
    parser.add_argument("--time-min", type=int, default=24 * 60, help="SLURM time limit")
    return parser.parse_args(argv)


def device_slots(gpus: int, gpus_per_run: int, present: int) -> list[list[int]]:
    """The GPU ids of each run slot: `gpus // gpus_per_run` slots of consecutive ids, all
    among the `present` devices."""
    if gpus_per_run < 1:
        raise ValueError(f"--gpus-per-run must be at least 1, got {gpus_per_run}")
    if gpus > present:
        raise ValueError(f"--gpus {gpus}: this machine has {present} GPU(s)")
    if gpus % gpus_per_run:
        raise ValueError(f"--gpus {gpus} is not a multiple of --gpus-per-run {gpus_per_run}")
    return [
        list(range(slot * gpus_per_run, (slot + 1) * gpus_per_run))
        for slot in range(gpus // gpus_per_run)
    ]


def slurm_executor(args, folder: Path):
    try:
        import submitit
    except ImportError as error:
        raise SystemExit("error: --slurm needs submitit: pip install submitit") from error
    executor = submitit.AutoExecutor(folder=str(folder / "slurm"))
    executor.update_parameters(
        slurm_partition=args.partition or None,
        gpus_per_node=args.gpus_per_run,
        tasks_per_node=1,  # torchrun starts the processes of the node
        cpus_per_task=8 * args.gpus_per_run,
        timeout_min=args.time_min,
    )
    return executor


def slurm_job(python: str):
    """One run as a SLURM job. On a time-out or pre-emption submitit calls `checkpoint`,
    whose default resubmits the same call: the job is requeued and the run resumes from its
    last checkpoint (execute passes --resume when there is one)."""
    import submitit

    class SweepJob(submitit.helpers.Checkpointable):
        def __call__(self, run, gpus_per_run: int) -> int:
            return execute(run, python, REPO, gpus_per_run)

    return SweepJob()


def describe(run, state) -> str:
    line = f"{state.state:12} {run.name:40} {state.detail}".rstrip()
    log = run.output_dir / "log.txt"
    if state.state == "failed" and log.is_file():
        line += f"\n{'':12} log: {log}"
    return line


def check_configs(runs) -> dict[str, str]:
    """{run name: the error} of each run whose config refuses a key or value."""
    problems = {}
    for run in runs:
        try:
            run.check_config()
        except (ConfigError, FileNotFoundError) as error:
            problems[run.name] = str(error)
    return problems


def to_run(runs, args) -> list:
    """The runs this call starts: new and interrupted, failed with --retry-failed, stale with
    --rerun-stale; `evaluate:` runs only once their trained run is done."""
    wanted = {"new", "interrupted"}
    if args.retry_failed:
        wanted.add("failed")
    if args.rerun_stale:
        wanted.add("stale")
    pending = []
    for run in runs:
        state = run_state(run).state
        if state in wanted and (run.evaluates is None or run_state(run.evaluates).state == "done"):
            pending.append(run)
    return pending


def main(args, executor=None) -> dict[str, str]:
    """Run the sweep; returns each run's state afterwards (or now, with --dry-run).
    `executor`: anything with submitit's `submit(fn, *args)` (tests pass a fake)."""
    runs = load_sweep(args.sweep, args.output)
    if args.only:
        runs = [r for r in runs if r.name in args.only or r.group in args.only]
    problems = check_configs(runs)
    for run in runs:
        if run.name in problems:
            print(f"{'invalid':12} {run.name:40} {problems[run.name]}")
        else:
            print(describe(run, run_state(run)))
        if args.dry_run:
            print(f"{'':12} overrides: {' '.join(run.overrides) or '-'}")
            try:
                command = " ".join(run.command(sys.executable))
            except FileNotFoundError:  # an evaluation of a run not finished yet
                command = f"(once {run.evaluates.name} has finished training)"
            print(f"{'':12} command: {command}")
    if problems:
        listed = "\n  ".join(f"{name}: {error}" for name, error in problems.items())
        raise ConfigError(f"configs refused:\n  {listed}")
    if args.dry_run:
        return {run.name: run_state(run).state for run in runs}
    python = sys.executable
    if args.gpus:
        import torch

        slots = queue.Queue()  # each slot's GPU ids, lent to one run at a time
        for ids in device_slots(args.gpus, args.gpus_per_run, torch.cuda.device_count()):
            slots.put(ids)
    if args.slurm or executor is not None:
        executor = executor or slurm_executor(args, runs[0].output_dir.parent)
        job = slurm_job(python) if args.slurm else execute_here(python)
    for trained_first in (True, False):  # runs that train, then those that evaluate them
        wave = [r for r in to_run(runs, args) if (r.evaluates is None) == trained_first]
        if not wave:
            continue
        if executor is not None:
            jobs = [executor.submit(job, run, args.gpus_per_run) for run in wave]
            for run, submitted in zip(wave, jobs):
                try:
                    submitted.result()
                except Exception as error:  # the job's own failure: the others go on
                    print(f"job of {run.name} failed: {error}", file=sys.stderr)
        elif args.gpus:

            def on_free_gpus(run):
                ids = slots.get()
                try:
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, ids))}
                    return execute(run, python, REPO, args.gpus_per_run, env)
                finally:
                    slots.put(ids)

            with ThreadPoolExecutor(max_workers=slots.qsize()) as pool:
                list(pool.map(on_free_gpus, wave))
        else:
            for run in wave:
                print(f"--> {run.name}", flush=True)
                execute(run, python, REPO, args.gpus_per_run)
    states = {run.name: run_state(run) for run in runs}
    print()
    for run in runs:
        if states[run.name].state != "done":
            print(describe(run, states[run.name]))
    done = sum(state.state == "done" for state in states.values())
    failed = sum(state.state == "failed" for state in states.values())
    print(f"{done} of {len(runs)} runs done, {failed} failed")
    return {name: state.state for name, state in states.items()}


def execute_here(python: str):
    """The job a test's fake executor runs: execute, as a SLURM job would."""

    def job(run, gpus_per_run: int) -> int:
        return execute(run, python, REPO, gpus_per_run)

    return job


if __name__ == "__main__":
    try:
        states = main(parse_args())
    except (ValueError, FileNotFoundError) as error:  # ConfigError is a ValueError
        sys.exit(f"error: {error}")
    sys.exit(1 if "failed" in states.values() else 0)
