"""Sweep files expand into named runs whose states are true: done runs are skipped, interrupted
ones resumed, failed and stale ones listed, `evaluate:` runs wait for their trained run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eomt.config import get_cfg
from eomt.engine.trainer import Trainer
from eomt.sweep import Run, execute, load_sweep, run_state
from tools import sweep as sweep_tool

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_runs_products_seeds_and_evaluations_expand_into_named_runs(tmp_path):
    path = write_sweep(
        tmp_path,
        """
name: s
config: base.yaml
overrides: [solver.max_iter=5]
seeds: [0, 1]
runs:
  a: [x=1]
  b: {config: other.yaml, overrides: [x=2], paper: table4.masking_masking}
  a_eval: {evaluate: a, overrides: [model.masked_attn=never]}
product:
  size: {small: [s=1], large: [s=2]}
  lr: {low: [lr=1], high: [lr=2]}
""",
    )
    runs = load_sweep(path, tmp_path / "out")
    names = [run.name for run in runs]
    per_seed = ["a", "b", "small_low", "small_high", "large_low", "large_high", "a_eval"]
    assert names == [f"{n}-seed{s}" for s in (0, 1) for n in per_seed]
    by_name = {run.name: run for run in runs}
    b = by_name["b-seed1"]
    assert (b.config, b.overrides) == ("other.yaml", ["solver.max_iter=5", "x=2", "seed=1"])
    assert b.output_dir == tmp_path / "out" / "s" / "b-seed1" and b.group == "b"
    assert b.paper == "table4.masking_masking"
    assert by_name["large_high-seed0"].overrides == ["solver.max_iter=5", "s=2", "lr=2", "seed=0"]
    evaluation = by_name["a_eval-seed1"]
    assert evaluation.evaluates is by_name["a-seed1"]
    (by_name["a-seed1"].output_dir).mkdir(parents=True)
    finished = {"mode": "train", "checkpoint": "model_0000005.pth", "iteration": 5}
    (by_name["a-seed1"].output_dir / "finished.json").write_text(json.dumps(finished))
    command = evaluation.command("python")
    assert command[:5] == [
        "python",
        "tools/train_net.py",
        "--config-file",
        "base.yaml",
        "--eval-only",
    ]
    assert f"model.weights={by_name['a-seed1'].output_dir / 'model_0000005.pth'}" in command
    assert command[-1] == f"output_dir={evaluation.output_dir}"
    assert by_name["a-seed0"].command("python", resume=True)[4] == "--resume"
    # Several GPUs: one process each, started by torchrun.
    assert by_name["a-seed0"].command("python", resume=True, num_gpus=4)[:9] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "tools/train_net.py",
        "--config-file",
        "base.yaml",
        "--resume",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("config: c.yaml\nrunz: {a: []}", "unknown keys \\['runz'\\]"),
        ("runs: {a: []}", "no 'config'"),
        ("config: c.yaml", "no runs"),
        ("config: c.yaml\nruns: {a: {evaluate: zz}}", "evaluates 'zz', not a run"),
        ("config: c.yaml\nruns: {a: {overides: []}}", "run 'a' must be a list of overrides"),
    ],
)
def test_bad_sweep_files_are_refused_by_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_sweep(write_sweep(tmp_path, text))


def test_a_tiny_sweep_resumes_a_run_killed_after_a_periodic_evaluation(
    synthetic_root, tmp_path, die_after_logging
):
    text = f"""
name: tiny
config: {REPO / "configs/synthetic/eomt_tiny_panoptic.yaml"}
overrides:
  - dataset.root={synthetic_root}
  - "model.backbone_kwargs={{embed_dim: 32, depth: 3, num_heads: 2}}"
  - input.image_size=[64, 64]
  - model.num_queries=8
  - loss.num_points=256
  - solver.max_iter=4
  - solver.batch_size_per_device=4
  - solver.warmup_iters=[1, 1]
  - checkpoint_period=1
  - test.eval_period=2
  - log_period=1
  - dataloader.num_workers=0
runs:
  only: {{overrides: [], paper: table4.annealing_no_masking}}
  only_unmasked: {{evaluate: only, overrides: [model.masked_attn=never]}}
"""
    path = write_sweep(tmp_path, text)
    run, evaluation = load_sweep(path, tmp_path / "out")
    # Killed in iteration 3, after the periodic evaluation and the checkpoint of iteration 2.
    cfg = get_cfg(run.config, [*run.overrides, f"output_dir={run.output_dir}"])
    die_after_logging(Trainer(cfg), 3)
    assert (run.output_dir / "evaluations" / "iteration_0000002.json").is_file()
    assert not (run.output_dir / "results.json").exists()
    assert run_state(run).state == "interrupted"
    assert run_state(run).detail.endswith("resumes from model_0000002.pth")
    assert run_state(evaluation).state == "waiting"

    args = sweep_tool.parse_args([str(path), "--output", str(tmp_path / "out")])
    assert sweep_tool.main(args) == {"only": "done", "only_unmasked": "done"}
    log = (run.output_dir / "log.txt").read_text()
    assert "--resume" in log and "resumed from" in log and "at iteration 2" in log
    finished = json.loads((run.output_dir / "finished.json").read_text())
    assert finished == {
        **finished,
        "mode": "train",
        "iteration": 4,
        "checkpoint": "model_0000004.pth",
    }
    scored = json.loads((evaluation.output_dir / "finished.json").read_text())
    assert scored["mode"] == "evaluate" and scored["iteration"] == 4
    assert scored["checkpoint"] == str(run.output_dir / "model_0000004.pth")
    recorded = json.loads((evaluation.output_dir / "run.json").read_text())
    assert recorded["evaluated"] == {"run": "only", "trained": finished}
    assert (
        recorded["paper"] is None and json.loads((run.output_dir / "run.json").read_text())["paper"]
    )
    # The evaluation folder has what a training run's has.
    assert (evaluation.output_dir / "config.yaml").is_file()
    assert "panoptic/PQ" in (evaluation.output_dir / "metrics.jsonl").read_text()

    # Done: nothing runs again.
    sizes = [(r.output_dir / "log.txt").stat().st_size for r in (run, evaluation)]
    sweep_tool.main(args)
    assert [(r.output_dir / "log.txt").stat().st_size for r in (run, evaluation)] == sizes
    # An override changed since: stale, listed, run again only when asked.
    write_sweep(tmp_path, text.replace("solver.max_iter=4", "solver.max_iter=5"))
    assert sweep_tool.main(args) == {"only": "stale", "only_unmasked": "stale"}
    assert [(r.output_dir / "log.txt").stat().st_size for r in (run, evaluation)] == sizes


# -- states ------------------------------------------------------------------------------------

TINY = str(REPO / "configs/synthetic/eomt_tiny_panoptic.yaml")


def sweep_of(tmp_path, runs: str, seeds: str = "") -> dict:
    path = write_sweep(tmp_path, f"name: s\nconfig: {TINY}\n{seeds}runs:\n{runs}")
    return {run.name: run for run in load_sweep(path, tmp_path / "out")}


def record(run, **attempt) -> None:
    """run.json as the runner writes it when it starts `run` (with `attempt`'s outcome)."""
    run.output_dir.mkdir(parents=True, exist_ok=True)
    value = {"name": run.name, "digest": run.digest(), "attempt": {"started": "t", **attempt}}
    (run.output_dir / "run.json").write_text(json.dumps(value))


def finish(run, mode="train") -> None:
    finished = {"mode": mode, "checkpoint": "model_0000005.pth", "iteration": 5}
    (run.output_dir / "finished.json").write_text(json.dumps(finished))


def test_states_follow_what_the_run_folder_records(tmp_path):
    runs = sweep_of(
        tmp_path,
        "  done: []\n  changed: []\n  broken: []\n  killed: []\n  live: []\n  gone: []\n"
        "  fresh: []\n  killed_eval: {evaluate: killed}\n  broken_eval: {evaluate: broken}\n"
        "  done_eval: {evaluate: done}\n",
    )
    record(runs["done"], exit_status=0)
    finish(runs["done"])
    record(runs["changed"], exit_status=0)
    finish(runs["changed"])
    runs["changed"].overrides.append("solver.lr=0.5")  # the sweep file changed since
    record(runs["broken"], exit_status=1)
    (runs["broken"].output_dir / "FAILED").write_text("exit status 1: ValueError: bad key\n")
    record(runs["killed"], exit_status=-9)
    (runs["killed"].output_dir / "model_0000002.pth").write_bytes(b"")
    for name, pid in (("live", os.getpid()), ("gone", 2**22 + 12345)):
        record(runs[name])  # started, no outcome yet
        lock = {"pid": pid, "host": socket.gethostname(), "since": "t"}
        (runs[name].output_dir / "RUNNING").write_text(json.dumps(lock))
    record(runs["done_eval"], exit_status=0)
    (runs["done_eval"].output_dir / "run.json").write_text(
        json.dumps(
            {
                "digest": runs["done_eval"].digest(),
                "attempt": {"exit_status": 0},
                "evaluated": {
                    "trained": json.loads((runs["done"].output_dir / "finished.json").read_text())
                },
            }
        )
    )
    finish(runs["done_eval"], "evaluate")

    states = {name: run_state(run) for name, run in runs.items()}
    assert {name: state.state for name, state in states.items()} == {
        "done": "done",
        "changed": "stale",
        "broken": "failed",
        "killed": "interrupted",
        "live": "running",
        "gone": "interrupted",
        "fresh": "new",
        "killed_eval": "waiting",
        "broken_eval": "failed",
        "done_eval": "done",
    }
    assert states["killed"].detail == "killed by SIGKILL; resumes from model_0000002.pth"
    assert states["broken"].detail == "exit status 1: ValueError: bad key"
    assert states["broken_eval"].detail == "broken failed: exit status 1: ValueError: bad key"
    assert states["killed_eval"].detail == "for killed (interrupted)"
    assert states["live"].detail.startswith(f"pid {os.getpid()} on ")
    # The trained run finishing again (another checkpoint) makes its evaluation stale.
    finished = {"mode": "train", "checkpoint": "model_0000009.pth", "iteration": 9}
    (runs["done"].output_dir / "finished.json").write_text(json.dumps(finished))
    assert run_state(runs["done_eval"]).state == "stale"


def test_a_signal_interrupts_and_an_error_fails_with_its_last_line(tmp_path, monkeypatch):
    runs = sweep_of(tmp_path, "  killed: []\n  broken: []\n  lock: []\n")
    scripts = {
        "killed": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        "broken": "print('train: 10%|#   | progress bar'); raise ValueError('bad key')",
        # the lock names this very process while it runs
        "lock": "import json, os, pathlib; lock = json.loads(pathlib.Path('RUNNING').read_text());"
        "pathlib.Path('seen').write_text(str(lock['pid'] == os.getpid()))",
    }
    monkeypatch.setattr(
        Run, "command", lambda self, python, **kw: [python, "-c", scripts[self.name]]
    )
    for name, run in runs.items():
        cwd = run.output_dir if name == "lock" else REPO
        run.output_dir.mkdir(parents=True)
        execute(run, sys.executable, cwd)
    assert run_state(runs["killed"]).state == "interrupted"
    assert run_state(runs["killed"]).detail.startswith("killed by SIGKILL")
    assert not (runs["killed"].output_dir / "FAILED").exists()
    broken = run_state(runs["broken"])
    assert (broken.state, broken.detail) == ("failed", "exit status 1: ValueError: bad key")
    assert (runs["lock"].output_dir / "seen").read_text() == "True"
    assert not (runs["lock"].output_dir / "RUNNING").exists()  # released at the end
    recorded = json.loads((runs["broken"].output_dir / "run.json").read_text())
    assert recorded["attempt"]["exit_status"] == 1 and recorded["digest"] == runs["broken"].digest()
    # A stale run is moved aside, not deleted, when it runs again.
    runs["lock"].overrides.append("solver.lr=0.5")
    finish(runs["lock"])
    assert run_state(runs["lock"]).state == "stale"
    execute(runs["lock"], sys.executable, runs["lock"].output_dir.parent)
    kept = list(runs["lock"].output_dir.parent.glob("lock.stale-*"))
    assert len(kept) == 1 and (kept[0] / "finished.json").is_file()


def test_the_runner_starts_what_is_due_and_carries_on_past_a_failed_trained_run(tmp_path, capsys):
    runs = sweep_of(
        tmp_path,
        "  a: []\n  a_eval: {evaluate: a}\n  b: []\n  b_eval: {evaluate: b}\n",
        seeds="seeds: [0, 1]\n",
    )
    record(runs["a-seed0"], exit_status=1)
    (runs["a-seed0"].output_dir / "FAILED").write_text("exit status 1: ValueError: bad key\n")
    record(runs["b-seed0"], exit_status=0)
    finish(runs["b-seed0"])
    record(runs["b-seed1"], exit_status=-15)  # pre-empted

    class FakeExecutor:  # submitit's interface: submit(fn, *args) -> job with .result()
        def __init__(self):
            self.submitted = []

        def submit(self, fn, *args):
            self.submitted.append(args[0].name)
            return type("Job", (), {"result": lambda self: 0})()

    def submitted(*flags) -> list[str]:
        executor = FakeExecutor()
        args = sweep_tool.parse_args(
            [str(tmp_path / "sweep.yaml"), "--output", str(tmp_path / "out"), *flags]
        )
        sweep_tool.main(args, executor=executor)
        return executor.submitted

    # The failed run's evaluation fails with it; the other seed's runs go on; b-seed0's
    # evaluation runs, b-seed1's waits for its interrupted run.
    assert submitted() == ["a-seed1", "b-seed1", "b_eval-seed0"]
    out = capsys.readouterr().out
    assert "a_eval-seed0" in out and "a-seed0 failed: exit status 1: ValueError: bad key" in out
    assert submitted("--retry-failed")[:3] == ["a-seed0", "a-seed1", "b-seed1"]
    assert submitted("--dry-run") == []
    out = capsys.readouterr().out
    assert (
        "overrides: seed=0" in out
        and "command: " in out
        and "--resume" not in out.split("b-seed1")[0]
    )


def test_dry_run_checks_every_runs_config(tmp_path):
    path = write_sweep(tmp_path, f"config: {TINY}\nruns:\n  good: []\n  typo: [solver.lrr=1]\n")
    done = subprocess.run(
        [sys.executable, "tools/sweep.py", str(path), "--output", str(tmp_path), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: configs refused:\n  typo: override: unknown config")
    assert "'solver.lrr'; did you mean solver.lr" in done.stderr
    assert "Traceback" not in done.stderr
    assert "invalid      typo" in done.stdout and "new          good" in done.stdout
    assert "command: " in done.stdout and "solver.lrr=1" in done.stdout


@pytest.mark.parametrize(
    "text, message",
    [("config: c.yaml\nrunz: {a: []}", "unknown keys ['runz']"), (None, "sweep file not found")],
)
def test_user_errors_are_one_line(tmp_path, text, message):
    path = write_sweep(tmp_path, text) if text else tmp_path / "missing.yaml"
    done = subprocess.run(
        [sys.executable, "tools/sweep.py", str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 1 and message in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")


def test_device_slots_hand_out_real_ids():
    assert sweep_tool.device_slots(8, 2, present=8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sweep_tool.device_slots(4, 1, present=8) == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="--gpus 8: this machine has 4 GPU"):
        sweep_tool.device_slots(8, 2, present=4)
    with pytest.raises(ValueError, match="not a multiple"):
        sweep_tool.device_slots(3, 2, present=4)


def test_a_process_given_gpus_that_sees_none_stops(monkeypatch):
    import torch

    from eomt import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=2,3 gives this process GPUs"):
        distributed.device()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert distributed.device() == torch.device("cpu")


def test_a_slurm_job_requeues_itself_to_resume(tmp_path):
    submitit = pytest.importorskip("submitit")
    (run,) = sweep_of(tmp_path, "  a: []\n").values()
    job = sweep_tool.slurm_job(sys.executable)
    assert isinstance(job, submitit.helpers.Checkpointable)
    again = job.checkpoint(run, 2)  # what submitit calls on a time-out or pre-emption
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function is job and again.args == (run, 2)
