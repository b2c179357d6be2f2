"""logging.tensorboard: the trainer's TensorBoard scalars are metrics.jsonl's, a resumed run's
included."""

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eomt.config import ConfigError
from eomt.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def read_tensorboard(folder) -> dict:
    """{(tag, step): value} of the event files in `folder`, as TensorBoard shows them (purged
    steps left out)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert (tag, event.step) not in scalars, f"{tag} twice at step {event.step}"
            scalars[tag, event.step] = event.value
    return scalars


def read_metrics(run) -> dict:
    """{(name, iteration): value} of metrics.jsonl, a list as one value per item."""
    scalars = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("iteration")
        for key, value in record.items():
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for index, item in items:
                tag = key if index is None else f"{key}/{index}"
                assert (tag, step) not in scalars, f"{tag} twice at iteration {step}"
                scalars[tag, step] = item
    return scalars


def assert_same(tensorboard: dict, metrics: dict) -> None:
    assert sorted(tensorboard) == sorted(metrics)
    for key, value in metrics.items():
        assert tensorboard[key] == float(np.float32(value)), key  # TensorBoard keeps float32


def test_scalars_equal_metrics_jsonl_and_a_resumed_run_appends(
    tiny_cfg, tmp_path, die_after_logging
):
    # Annealed masked attention (attn_mask_probs in the records), an evaluation every 2
    # iterations and a checkpoint every 2; the first run dies at iteration 3, after logging it.
    cfg = tiny_cfg(
        "logging.tensorboard=true",
        "solver.max_iter=4",
        "solver.anneal_start=[1, 2]",
        "solver.anneal_end=[2, 3]",
        "test.eval_period=2",
        "checkpoint_period=2",
    )
    die_after_logging(Trainer(cfg), 3)
    run = tmp_path / "run"
    before = read_tensorboard(run / "tensorboard")
    assert_same(before, read_metrics(run))  # flushed as logged, though the run died
    tags = {tag for tag, _ in before}
    assert {"loss", "lr", "backbone_lr", "time_per_iter", "panoptic/PQ"} <= tags
    assert {"attn_mask_probs/0", "attn_mask_probs/1"} <= tags
    assert ("loss", 3) in before and ("panoptic/PQ", 2) in before

    # Resumed from the checkpoint of 2: the evaluation of 2 and iteration 3 are redone.
    resumed = Trainer(cfg)
    assert resumed.resume() and resumed.iteration == 2
    resumed.train()
    tensorboard, metrics = read_tensorboard(run / "tensorboard"), read_metrics(run)
    assert_same(tensorboard, metrics)
    assert {step for tag, step in tensorboard if tag == "loss"} == {1, 2, 3, 4}
    assert {step for tag, step in tensorboard if tag == "panoptic/PQ"} == {2, 4}
    assert tensorboard["loss", 2] == before["loss", 2]  # written again from metrics.jsonl
    assert len(list((run / "tensorboard").iterdir())) == 2  # appended: a second event file


def test_off_by_default_and_strictly_typed(tiny_cfg):
    assert tiny_cfg().logging.tensorboard is False
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        tiny_cfg("logging.tensorboard=yes please")
    with pytest.raises(ConfigError, match="logging.tensorboar"):
        tiny_cfg("logging.tensorboar=true")
