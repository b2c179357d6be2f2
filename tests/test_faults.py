"""Faults during training: killed processes, full or unwritable disks, non-finite losses, and
data-parallel training against one process. The kill and multi-process tests run
`tools/train_net.py` in real processes, as users do."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eomt.data import generate_synthetic_dataset
from eomt.data.bad_samples import BadSampleError, BadSampleWarning
from eomt.engine import trainer as trainer_module
from eomt.engine.checkpoint import checkpoints_newest_first
from eomt.engine.trainer import Trainer
from eomt.weights import files as files_module
from eomt.weights.files import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN_NET = str(REPO / "tools" / "train_net.py")
# Runs train_net.py with every fsync slowed down, so that a test can kill the process while a
# checkpoint is being written (its temporary file complete or not, not yet renamed).
SLOW_FSYNC = """
import os, runpy, sys, time
fsync = os.fsync
os.fsync = lambda fd: (time.sleep(float(os.environ["SLOW_FSYNC_S"])), fsync(fd))[1]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def records(output_dir: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    logged = [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k != "time_per_iter"} for r in logged]


def start(config_file: Path, *args: str, slow_fsync: float = 0.0) -> subprocess.Popen:
    command = [sys.executable, TRAIN_NET, "--config-file", str(config_file), *args]
    env = dict(os.environ)
    if slow_fsync:
        command[1:1] = ["-c", SLOW_FSYNC]
        env["SLOW_FSYNC_S"] = str(slow_fsync)
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"training ended before the fault:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for the moment to inject the fault")
        time.sleep(0.002)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()


def logged_iterations(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def final_evaluation_logged(output_dir: Path, max_iter: int) -> bool:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    try:
        last = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:  # caught while being written
        return False
    return last.get("iteration") == max_iter and "panoptic/PQ" in last


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    overrides = ["solver.max_iter=8", "test.eval_period=4"]
    cfg = tiny_cfg(*overrides, "checkpoint_period=1", f"output_dir={tmp_path / 'killed'}")
    config_file = tmp_path / "config.yaml"
    OmegaConf.save(cfg, config_file)
    output_dir = Path(cfg.output_dir)

    # 1. Killed while writing the checkpoint of iteration 3.
    process = start(config_file, slow_fsync=0.5)
    wait_for(lambda: list(output_dir.glob(".model_0000003.pth.*.tmp")), process)
    kill(process)
    assert [p.name for p in checkpoints_newest_first(output_dir)][0] == "model_0000002.pth"
    assert list(output_dir.glob(".model_0000003.pth.*.tmp"))  # the partial file is left behind

    # 2. Resumed, then killed at a random moment after iteration 5 was logged.
    process = start(config_file, "--resume")
    wait_for(lambda: logged_iterations(output_dir) >= 5, process)
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    kill(process)
    assert not list(output_dir.glob(".model_0000003.pth.*.tmp"))  # removed on resume
    for path in checkpoints_newest_first(output_dir):
        read_checkpoint(path)  # every checkpoint left by the kills reads back whole

    # 3. Resumed (maybe after the end), killed once the final evaluation is logged, before
    #    the process could exit: on resume it is redone, and logged once.
    process = start(config_file, "--resume")
    wait_for(lambda: final_evaluation_logged(output_dir, 8), process)
    kill(process)

    # 4. Resumed to the end.
    process = start(config_file, "--resume")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "resumed from" in output

    reference = Trainer(tiny_cfg(*overrides, f"output_dir={tmp_path / 'reference'}"))
    reference.train()
    final = read_checkpoint(output_dir / "model_0000008.pth")
    assert_same_parameters(reference.model.state_dict(), final["model"])
    assert records(output_dir) == records(tmp_path / "reference")  # losses, lrs and PQ
    assert final["optimizer"]["state"].keys() == reference.optimizer.state_dict()["state"].keys()


def test_unwritable_output_dir_fails_before_training(tiny_cfg, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    trainer = Trainer(tiny_cfg(f"output_dir={blocker / 'run'}"))
    with pytest.raises(OSError, match=f"output_dir {blocker / 'run'} is not writable"):
        trainer.train()
    assert trainer.iteration == 0


def test_too_little_disk_fails_before_training(tiny_cfg, monkeypatch):
    trainer = Trainer(tiny_cfg())
    usage = trainer_module.shutil.disk_usage(trainer.output_dir.parent)
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(OSError, match=r"has 0\.0 MiB free, one checkpoint needs about"):
        trainer.train()
    assert trainer.iteration == 0 and not checkpoints_newest_first(trainer.output_dir)


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_cfg, monkeypatch):
    trainer = Trainer(tiny_cfg())  # checkpoints at iterations 3 and 6
    fdopen = os.fdopen

    def disk_fills_at_iteration_6(fd, *args, **kwargs):
        file = fdopen(fd, *args, **kwargs)
        if "model_0000006" in os.readlink(f"/proc/self/fd/{fd}"):
            return FullDisk(file, room=1000)  # torch's writer swallows the OSError
        return file

    monkeypatch.setattr(files_module.os, "fdopen", disk_fills_at_iteration_6)
    message = (
        r"could not write the checkpoint of iteration 6 to .*run/model_0000006.pth \(No space left "
        r"on device\); "
        r"model_0000003.pth is intact"
    )
    with pytest.raises(OSError, match=message):
        trainer.train()
    assert [p.name for p in checkpoints_newest_first(trainer.output_dir)] == ["model_0000003.pth"]
    assert not list(trainer.output_dir.glob(".*.tmp"))
    assert read_checkpoint(trainer.output_dir / "model_0000003.pth")["iteration"] == 3


def poison(trainer: Trainer, iterations: set[int]) -> None:
    """Make the loss NaN at the given iterations, through the autograd graph."""
    criterion = trainer.criterion

    def criterion_with_nan(*args):
        losses = criterion(*args)
        if trainer.iteration in iterations:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    trainer.criterion = criterion_with_nan


def test_nonfinite_loss_stops_naming_the_iteration_and_terms(tiny_cfg):
    trainer = Trainer(tiny_cfg())
    poison(trainer, {3})  # the step logged as iteration 4
    with pytest.raises(FloatingPointError) as raised:
        trainer.train()
    message = str(raised.value)
    assert message.startswith("non-finite loss at iteration 4: loss_mask_0=nan")
    assert "loss_class_0=nan" in message and "solver.nonfinite_loss=skip" in message
    assert [p.name for p in checkpoints_newest_first(trainer.output_dir)] == ["model_0000003.pth"]
    resumed = Trainer(trainer.cfg)
    assert resumed.resume() and resumed.iteration == 3


def test_nonfinite_loss_skipped_when_configured(tiny_cfg, tmp_path):
    trainer = Trainer(tiny_cfg("solver.nonfinite_loss=skip", "solver.max_skipped_steps=2"))
    poison(trainer, {2, 3})
    before = {}
    original_step = trainer._step

    def step_and_check(*args):
        if trainer.iteration in (2, 3):
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        losses = original_step(*args)
        if trainer.iteration in (2, 3):
            assert_same_parameters(before, trainer.model.state_dict())
        return losses

    trainer._step = step_and_check
    with pytest.warns(UserWarning, match=r"non-finite loss at iteration 4: .*step skipped \(2 of"):
        trainer.train()
    logged = records(trainer.output_dir)
    assert [r["loss"] for r in logged[2:4]] == [None, None]
    assert logged[4]["skipped_steps"] == 2 and logged[4]["loss"] > 0
    assert read_checkpoint(trainer.output_dir / "model_0000006.pth")["skipped_steps"] == 2

    # One more than allowed stops the run.
    trainer = Trainer(
        tiny_cfg(
            "solver.nonfinite_loss=skip",
            "solver.max_skipped_steps=1",
            f"output_dir={tmp_path / 'stopped'}",
        )
    )
    poison(trainer, {2, 3})
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="iteration 4"):
        trainer.train()


def test_two_processes_match_one_process(tiny_cfg, tmp_path):
    """DDP over gloo, started by `train_net.py --num-gpus 2`, against one process with two
    accumulation steps: the same global batch of 4 images per step."""
    overrides = ["solver.max_iter=4", "checkpoint_period=4"]
    two = tiny_cfg(*overrides, f"output_dir={tmp_path / 'two'}")
    config_file = tmp_path / "config.yaml"
    OmegaConf.save(two, config_file)
    process = start(config_file, "--num-gpus", "2")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output

    one = Trainer(tiny_cfg(*overrides, f"output_dir={tmp_path / 'one'}"))
    one.train()
    trained_by_two = read_checkpoint(tmp_path / "two" / "model_0000004.pth")["model"]
    # Bit for bit: each micro-batch sees the same data and random numbers, and averaging two
    # gradients over processes, (g0 + g1) / 2, rounds exactly as accumulating g0 / 2 + g1 / 2
    # (halving is exact). With more processes only the order of the sums would differ.
    assert_same_parameters(one.model.state_dict(), trained_by_two)
    assert records(tmp_path / "one")[:4] == records(tmp_path / "two")[:4]  # logged step losses

    # The two processes' evaluation of their model equals one process's evaluation of it.
    evaluated_by_two = json.load(open(tmp_path / "two" / "results.json"))
    single = Trainer(tiny_cfg(f"model.weights={tmp_path / 'two' / 'model_0000004.pth'}"))
    evaluated_by_one = json.loads(json.dumps(trainer_module._jsonable(single.test())))
    assert evaluated_by_one == evaluated_by_two


def test_bad_training_image_stops_or_is_skipped_and_counted(tiny_cfg, tmp_path):
    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_train=4, num_val=1, seed=5)
    truncated = root / "images" / "train" / "000002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:100])
    overrides = [f"dataset.root={root}", "solver.max_iter=4"]
    with pytest.raises(BadSampleError, match=f"{truncated}: image file is corrupt, truncated"):
        Trainer(tiny_cfg(*overrides)).train()
    trainer = Trainer(tiny_cfg(*overrides, "dataset.bad_samples=skip"))
    with pytest.warns(BadSampleWarning, match=str(truncated)):
        trainer.train()
    # 16 images read from an epoch of 4, the bad one replaced each time it came up.
    assert records(trainer.output_dir)[3]["skipped_samples"] == 4


def test_bad_evaluation_image_is_left_out_and_reported(tiny_cfg, tmp_path, capsys):
    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_train=1, num_val=3, seed=5)
    truncated = root / "images" / "val" / "000002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:100])
    trainer = Trainer(tiny_cfg(f"dataset.root={root}", "dataset.bad_samples=skip"))
    with pytest.warns(BadSampleWarning):
        results = trainer.test()
    assert results["skipped_images"]["count"] == 1
    assert str(truncated) in results["skipped_images"]["problems"][0]
    assert capsys.readouterr().out.strip().endswith("(bad images left out: 1)")
    saved = json.load(open(trainer.output_dir / "results.json"))
    assert saved["skipped_images"]["count"] == 1
