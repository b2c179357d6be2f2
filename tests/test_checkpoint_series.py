"""tools/evaluate_checkpoints.py: every checkpoint of a tiny run evaluated, written, drawn;
what is done is not redone; the last checkpoint's metrics are the trainer's own."""

import json
from pathlib import Path

import pytest

from eomt.engine import checkpoint_series
from eomt.engine.checkpoint_series import _has_metrics, select_checkpoints
from eomt.engine.trainer import Trainer, _scalar_metrics
from tools import evaluate_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_run_evaluated_checkpoint_by_checkpoint(tiny_cfg, tmp_path, monkeypatch, capsys):
    Trainer(tiny_cfg()).train()  # 6 iterations, a checkpoint every 3
    run = tmp_path / "run"
    final = (run / "results.json").read_text()

    evaluated = []
    test = Trainer.test

    def counted(self, *args, **kwargs):
        evaluated.append(self.iteration)
        return test(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "test", counted)
    series = evaluate_checkpoints.main(["--run", str(run)])
    assert evaluated == [3, 6]
    written = (run / "checkpoint_series.jsonl").read_text()
    assert written.endswith("\n")
    lines = [json.loads(line) for line in written.splitlines()]
    assert lines == series
    assert [r["iteration"] for r in lines] == [3, 6]
    assert [r["checkpoint"] for r in lines] == ["model_0000003.pth", "model_0000006.pth"]
    assert {"panoptic/PQ", "panoptic/SQ", "panoptic/RQ"} <= set(lines[0])
    # The last checkpoint's metrics, exactly the trainer's final evaluation, which stays.
    assert {k: v for k, v in lines[-1].items() if "/" in k} == _scalar_metrics(json.loads(final))
    assert (run / "results.json").read_text() == final
    for name in ("model_0000003", "model_0000006"):
        assert (run / "checkpoint_series" / name / "results.json").is_file()
    png = (run / "checkpoint_series.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    out = capsys.readouterr().out
    assert "iteration  panoptic/PQ" in out and "checkpoint_series.png" in out

    # Again: nothing new. With a record lost: that checkpoint only, to the same numbers.
    assert evaluate_checkpoints.main(["--run", str(run)]) == series and evaluated == [3, 6]
    (run / "checkpoint_series.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (run / "checkpoint_series.png").unlink()
    assert evaluate_checkpoints.main([f"--run={run}"]) == series
    assert evaluated == [3, 6, 6]
    assert (run / "checkpoint_series.png").stat().st_size > 0


def test_every_nth_checkpoint_and_the_last():
    paths = [Path(f"model_{i:07d}.pth") for i in (3, 6, 9, 12, 15)]
    assert select_checkpoints(paths, 1) == paths
    assert select_checkpoints(paths, 2) == [paths[0], paths[2], paths[4]]
    assert select_checkpoints(paths, 3) == [paths[0], paths[3], paths[4]]
    assert select_checkpoints(paths, 9) == [paths[0], paths[4]]
    with pytest.raises(ValueError, match="at least 1"):
        select_checkpoints(paths, 0)


def test_a_checkpoint_without_a_metric_asked_for_is_evaluated_again():
    record = {"iteration": 3, "checkpoint": "model_0000003.pth", "panoptic/PQ": 1.0}
    assert _has_metrics(record, ["panoptic"])
    assert not _has_metrics(record, ["panoptic", "semantic"])
    assert not _has_metrics(None, ["panoptic"])


def test_clear_errors_for_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        evaluate_checkpoints.main(["--run", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        evaluate_checkpoints.main(["--run", str(tmp_path)])
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint \(model_NNNNNNN.pth\)"):
        evaluate_checkpoints.main(["--run", str(tmp_path)])
    (tmp_path / "model_0000003.pth").write_bytes(b"")
    (tmp_path / checkpoint_series.SERIES_FILE).write_text('{"iteration": 3}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not a record"):
        evaluate_checkpoints.main(["--run", str(tmp_path)])
