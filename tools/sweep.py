"""Run a sweep file's runs (eomt/sweep.py describes the file), skipping the finished ones.

    python tools/sweep.py configs/sweeps/table4_annealing_synthetic.yaml --dry-run
    python tools/sweep.py SWEEP.yaml                      # one run after another, here
    python tools/sweep.py SWEEP.yaml --gpus 4             # 4 runs at a time, one GPU each
    python tools/sweep.py SWEEP.yaml --gpus-per-run 8     # each run on 8 GPUs (DDP, torchrun)
    python tools/sweep.py SWEEP.yaml --slurm --partition gpu --gpus-per-run 4   # submitit

Each run writes into <output>/<sweep name>/<run>/ and its output to log.txt there. A run with
results.json is done and skipped; one with checkpoints but no results resumes from its last
checkpoint (train_net --resume); one that failed (FAILED beside its log) is reported with the
last lines of its log, and run again only with --retry-failed. Then `tools/report.py` collects
the results. SLURM goes through `submitit` (pip install submitit): one job per run.
"""

import argparse
import os
import queue
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eomt.sweep import execute, load_sweep, run_state

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("sweep", help="sweep YAML file")
    parser.add_argument("--output", default="output/sweeps", help="folder of the sweeps")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their states")
    parser.add_argument("--only", nargs="+", help="run only these runs (names or groups)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    parser.add_argument("--gpus", type=int, default=0, help="local GPUs: that many runs at once")
    parser.add_argument(
        "--gpus-per-run", type=int, default=1, help="DDP processes per run (started by torchrun)"
    )
    parser.add_argument("--slurm", action="store_true", help="submit each run with submitit")
    parser.add_argument("--partition", default="", help="SLURM partition")
    parser.add_argument("--time-min", type=int, default=24 * 60, help="SLURM time limit")
    return parser.parse_args(argv)


def slurm_executor(args, folder: Path):
    try:
        import submitit
    except ImportError as error:
        raise SystemExit("--slurm needs submitit: pip install submitit") from error
    executor = submitit.AutoExecutor(folder=str(folder / "slurm"))
    executor.update_parameters(
        slurm_partition=args.partition or None,
        gpus_per_node=args.gpus_per_run,
        tasks_per_node=1,  # torchrun starts the processes of the node
        cpus_per_task=8 * args.gpus_per_run,
        timeout_min=args.time_min,
    )
    return executor


def waves(runs: list) -> list[list]:
    """Runs that train, then runs that evaluate them (which wait for their checkpoints)."""
    return [[r for r in runs if r.evaluates is None], [r for r in runs if r.evaluates]]


def main(args, executor=None) -> dict[str, str]:
    """Run the sweep; returns each run's state afterwards (or now, with --dry-run).
    `executor`: anything with submitit's `submit(fn, *args)` (tests pass a fake)."""
    runs = load_sweep(args.sweep, args.output)
    if args.only:
        runs = [r for r in runs if r.name in args.only or r.group in args.only]
    pending, states = [], {}
    for run in runs:
        state = run_state(run)
        todo = state.state in ("new", "interrupted") or (
            state.state == "failed" and args.retry_failed
        )
        print(f"{state.state:12} {run.name:40} {run.output_dir}")
        if state.state == "failed" and not args.retry_failed:
            print("             " + "\n             ".join(state.log_tail))
        states[run.name] = state.state
        if todo:
            pending.append(run)
    if args.dry_run or not pending:
        return states
    python = sys.executable
    if args.slurm or executor is not None:
        executor = executor or slurm_executor(args, runs[0].output_dir.parent)
        for wave in waves(pending):
            jobs = [executor.submit(execute, r, python, REPO, args.gpus_per_run) for r in wave]
            for job in jobs:
                job.result()
    elif args.gpus > 1:
        slots = queue.Queue()  # each a group of gpus_per_run GPU indices, lent to one run
        for slot in range(args.gpus):
            slots.put(range(slot * args.gpus_per_run, (slot + 1) * args.gpus_per_run))

        def on_free_gpus(run):
            gpus = slots.get()
            try:
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
                return execute(run, python, REPO, args.gpus_per_run, env)
            finally:
                slots.put(gpus)

        for wave in waves(pending):
            with ThreadPoolExecutor(max_workers=args.gpus) as pool:
                list(pool.map(on_free_gpus, wave))
    else:
        for run in pending:
            print(f"--> {run.name}", flush=True)
            execute(run, python, REPO, args.gpus_per_run)
    states = {run.name: run_state(run).state for run in runs}
    failed = [run for run in runs if states[run.name] == "failed"]
    for run in failed:
        tail = "\n    ".join(run_state(run).log_tail)
        print(f"FAILED {run.name} ({run.output_dir / 'log.txt'}):\n    {tail}")
    done = sum(state == "done" for state in states.values())
    print(f"{done} of {len(runs)} runs done, {len(failed)} failed")
    return states


if __name__ == "__main__":
    states = main(parse_args())
    sys.exit(1 if "failed" in states.values() else 0)
