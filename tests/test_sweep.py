"""Sweep files expand into named runs; finished runs are skipped, interrupted ones resumed."""

import json
import sys
from pathlib import Path

import pytest

from eomt.sweep import load_sweep, run_state
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
    (by_name["a-seed1"].output_dir / "last_checkpoint").write_text("model_0000005.pth\n")
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


def test_states_and_the_fake_cluster_path(tmp_path, capsys):
    path = write_sweep(tmp_path, "config: c.yaml\nruns: {done: [], cut: [], broken: [], fresh: []}")
    runs = {run.name: run for run in load_sweep(path, tmp_path / "out")}
    for run in runs.values():
        run.output_dir.mkdir(parents=True)
    (runs["done"].output_dir / "results.json").write_text("{}")
    (runs["cut"].output_dir / "model_0000002.pth").write_bytes(b"")
    (runs["broken"].output_dir / "FAILED").write_text("exit status 1\n")
    (runs["broken"].output_dir / "log.txt").write_text("line\n" * 30 + "ValueError: bad key\n")
    assert {n: run_state(r).state for n, r in runs.items()} == {
        "done": "done",
        "cut": "interrupted",
        "broken": "failed",
        "fresh": "new",
    }
    assert run_state(runs["broken"]).log_tail[-1] == "ValueError: bad key"

    class FakeExecutor:  # submitit's interface: submit(fn, *args) -> job with .result()
        def __init__(self):
            self.submitted = []

        def submit(self, fn, *args):
            self.submitted.append(args[0].name)
            return type("Job", (), {"result": lambda self: 0})()

    executor = FakeExecutor()
    args = sweep_tool.parse_args([str(path), "--output", str(tmp_path / "out")])
    states = sweep_tool.main(args, executor=executor)
    assert executor.submitted == ["cut", "fresh"]  # not the finished one, not the failed one
    assert states["broken"] == "failed"
    assert "ValueError: bad key" in capsys.readouterr().out  # the failure's log tail is shown
    executor = FakeExecutor()
    sweep_tool.main(
        sweep_tool.parse_args([*map(str, [path, "--output", tmp_path / "out"]), "--retry-failed"]),
        executor=executor,
    )
    assert executor.submitted == ["cut", "broken", "fresh"]
    executor = FakeExecutor()
    sweep_tool.main(
        sweep_tool.parse_args([str(path), "--output", str(tmp_path / "out"), "--dry-run"]),
        executor=executor,
    )
    assert executor.submitted == []


def test_a_tiny_sweep_runs_skips_when_done_and_resumes_when_interrupted(synthetic_root, tmp_path):
    path = write_sweep(
        tmp_path,
        f"""
name: tiny
config: {REPO / "configs/synthetic/eomt_tiny_panoptic.yaml"}
overrides:
  - dataset.root={synthetic_root}
  - "model.backbone_kwargs={{embed_dim: 32, depth: 3, num_heads: 2}}"
  - input.image_size=[64, 64]
  - model.num_queries=8
  - loss.num_points=256
  - solver.max_iter=2
  - solver.batch_size_per_device=4
  - solver.warmup_iters=[1, 1]
  - checkpoint_period=1
  - log_period=1
  - dataloader.num_workers=0
runs:
  only: {{overrides: [], paper: table4.annealing_no_masking}}
""",
    )
    args = sweep_tool.parse_args([str(path), "--output", str(tmp_path / "out")])
    assert sweep_tool.main(args) == {"only": "done"}
    (run,) = load_sweep(path, tmp_path / "out")
    assert (
        json.loads((run.output_dir / "run.json").read_text())["paper"]
        == "table4.annealing_no_masking"
    )
    first_results = (run.output_dir / "results.json").read_text()
    # Done: nothing runs again.
    log_size = (run.output_dir / "log.txt").stat().st_size
    sweep_tool.main(args)
    assert (run.output_dir / "log.txt").stat().st_size == log_size
    # Interrupted (checkpoints, no results): resumed from the last checkpoint, not redone.
    (run.output_dir / "results.json").unlink()
    assert sweep_tool.main(args) == {"only": "done"}
    log = (run.output_dir / "log.txt").read_text()
    commands = [line for line in log.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" not in commands[0] and "--resume" in commands[1]
    assert "resumed from" in log and "at iteration 2" in log
    assert json.loads((run.output_dir / "results.json").read_text()) == json.loads(first_results)
    assert sys.executable in log
