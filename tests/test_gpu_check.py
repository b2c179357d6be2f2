"""tools/gpu_check.py (the steps of eomt/gpu_check.py): its CPU dry run (every step at tiny
sizes) and its wheel step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eomt import gpu_check as checks
from tools import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run in a fresh process, as `make gpu-check DEVICE=cpu` starts it (about a
    minute on 2 cores: one torch.compile)."""
    output = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        # The budget is not under test here: a loaded machine must not skip steps.
        [sys.executable, "tools/gpu_check.py", "--device", "cpu", "--output", str(output)]
        + ["--budget-s", "1000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return json.loads((output / "gpu_check.json").read_text()), done


def test_every_step_runs_without_error(dry_run):
    record, done = dry_run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list(record["steps"]) == list(checks.STEPS)
    for name, result in record["steps"].items():
        assert "error" not in result, (name, result)
        assert "skipped" not in result or name == "autotune", (name, result)
    assert record["steps"]["tests"]["returncode"] == 0
    assert record["failed_steps"] == []
    steps_table = done.stdout[done.stdout.index("| Step | seconds | outcome |") :]
    assert all(f"| {name} | " in steps_table for name in checks.STEPS)
    assert "FAILED" not in steps_table and "No step failed." in steps_table


def test_fast_path_options_agree_with_eager_float32(dry_run):
    record, _ = dry_run
    variants = {checks.variant_of(v): v for v in record["steps"]["fast_path"]["variants"]}
    assert set(variants) == set(checks.FAST_PATH_VARIANTS["cpu"])
    assert all(v["agrees"] and v["fps"] > 0 for v in variants.values())
    # float32 paths (torch.compile among them) compute the eager function to rounding; half
    # weights and bf16 autocast differ by more than rounding but within half precision.
    for (_, _, weights_dtype, autocast), variant in variants.items():
        precision = variant["precision"]
        if (weights_dtype, autocast) == ("fp32", "none"):
            assert precision == "fp32" and variant["relative_error"] < 1e-5
        else:
            assert 1e-4 < variant["relative_error"] < checks.AGREEMENT_TOLERANCE, precision
    assert variants["none", "auto", "fp32", "bf16"]["precision"] == "fp32 weights + bf16 autocast"
    assert variants["none", "auto", "fp16", "none"]["precision"] == "fp16 weights"


def test_fps_table_training_batched_demo_and_onnx_are_measured(dry_run):
    record, done = dry_run
    stdout = done.stdout
    steps = record["steps"]
    rows = {**steps["headline"], **steps["table"]}
    assert set(checks.MODELS) - set(rows) == {"EoMT-L 640"}  # in fast_path
    for name, row in rows.items():
        if isinstance(row, dict):
            assert row["agrees"] and row["fps"] > 0 and row["paper_fps"] > 0, name
    assert steps["headline"]["eomt_over_m2f"] > 0
    training = steps["training"]
    assert len(training["losses"]) == training["steps"] and 0 < training["loss_fraction"] < 1
    (batch,) = steps["batched"]["batches"]
    assert batch["images_per_second"] > 0 and 0 < batch["share_of_matmul_ceiling"] < 1
    assert steps["batched"]["flops_per_image"] > 0
    demo = steps["demo"]
    assert demo["last_loss"] < demo["first_loss"] and 0 <= demo["pq"] <= 100
    for precision, tolerance in (("fp32", 1e-4), ("fp16", 1e-2)):  # of the logits' scale
        onnx = steps["onnx"][precision]
        assert onnx["agrees"] and onnx["relative_error"] < tolerance, precision
        assert onnx["label_agreement"] >= 0.99, precision
    # The table comes last, with a row per model.
    table = stdout[stdout.index("| Model (batch 1) |") :]
    assert all(f"| {name} | " in table for name in checks.MODELS)
    assert "EoMT-L / M2F-L 640" in table and "CPU dry run at tiny sizes" in stdout


def test_paper_fps_come_from_paper_results():
    assert checks.paper_fps("EoMT-L 640") == 128 and checks.paper_fps("M2F-L 640") == 29
    assert checks.paper_fps("EoMT-L 1280") == 30
    assert all(checks.paper_fps(name) > 0 for name in checks.MODELS)


def test_a_failed_step_is_named_and_sets_the_exit_status(tmp_path, monkeypatch, capsys):
    argv = ["--device", "cpu", "--output", str(tmp_path), "--steps", "environment,matmul"]
    record = gpu_check.main(gpu_check.parse_args(argv))
    assert record["failed_steps"] == [] and gpu_check.exit_status(record) == 0
    assert "No step failed." in capsys.readouterr().out

    def broken(run):
        raise RuntimeError("no such kernel")

    monkeypatch.setitem(checks.STEP_FUNCTIONS, "matmul", broken)
    record = gpu_check.main(gpu_check.parse_args(argv))
    assert record["failed_steps"] == ["matmul"] and gpu_check.exit_status(record) == 1
    table = capsys.readouterr().out
    assert "| environment | " in table and "| ok |" in table
    assert "FAILED: error: RuntimeError: no such kernel |" in table
    assert table.rstrip().endswith("FAILED steps: matmul")
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["failed_steps"] == ["matmul"]


def test_what_counts_as_a_failed_step():
    agreeing = {"precision": "bf16 weights", "relative_error": 1e-3, "agrees": True, "fps": 9}
    disagreeing = {**agreeing, "relative_error": 0.3, "agrees": False}
    assert checks.step_failures({"variants": [agreeing, {"skipped": "time budget"}]}) == []
    assert checks.step_failures({"variants": [agreeing, disagreeing]}) == [
        "bf16 weights: relative error 0.3"
    ]
    # A failed try before an agreeing one is the fallback at work; no agreeing try fails.
    tried = [{"variant": [], "error": "OutOfMemoryError"}]
    assert checks.step_failures({"M2F-L 640": {**agreeing, "tried": tried}}) == []
    assert checks.step_failures({"M2F-L 640": {"tried": tried}}) == ["no option ran and agreed"]
    assert checks.step_failures({"returncode": 1, "summary": "1 failed"}) == [
        "pytest exit status 1: 1 failed"
    ]
    assert checks.step_failures({"loss_fell": False}) == ["the loss did not fall"]
    assert checks.step_failures({"EoMT-g 640": {"error": "killed"}}) == ["error: killed"]


def test_a_step_past_the_budget_is_recorded_as_skipped(tmp_path):
    args = gpu_check.parse_args(["--device", "cpu", "--output", str(tmp_path), "--budget-s", "0"])
    args.steps = "environment,matmul"
    record = gpu_check.main(args)
    assert record["steps"] == {
        "environment": {"skipped": "time budget"},
        "matmul": {"skipped": "time budget"},
    }
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"] == record["steps"]


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu", "--steps", "fps,tests"])
    assert "unknown ['fps']" in capsys.readouterr().err
    if not gpu_check.torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device here; the dry run is --device cpu"):
            gpu_check.main(gpu_check.parse_args(["--device", "cuda"]))


def test_wheels_are_downloaded_for_python_3_12_or_built_from_source(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        source_only = "download" in command and command[-1].startswith("fvcore")
        return subprocess.CompletedProcess(command, 1 if source_only else 0)

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    gpu_check.build_wheels(tmp_path / "wheels")
    downloads = [c for c in calls if "download" in c]
    assert [c[-1] for c in downloads] == gpu_check.GPU_WHEELS
    assert all(
        "--python-version" in c and c[c.index("--python-version") + 1] == "3.12" for c in downloads
    )
    (built,) = [c for c in calls if "wheel" in c]
    assert built[-1].startswith("fvcore") and "--no-deps" in built
