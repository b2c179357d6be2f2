import json

import pytest
import torch
from omegaconf import OmegaConf

from eomt.data import generate_synthetic_dataset
from eomt.deploy.predictor import Predictor
from eomt.engine.checkpoint import checkpoints_newest_first
from eomt.engine.trainer import Trainer, accumulation_steps
from eomt.weights.files import read_checkpoint


def test_resume_gives_identical_parameters(tiny_cfg, tmp_path, die_after_logging):
    # Masked attention is annealed across the run, and two accumulation steps per iteration.
    # An evaluation every 2 iterations must not disturb the run either.
    overrides = ["solver.anneal_start=[1, 2]", "solver.anneal_end=[3, 5]", "test.eval_period=2"]
    uninterrupted = Trainer(tiny_cfg(*overrides, f"output_dir={tmp_path / 'a'}"))
    uninterrupted.train()

    cfg = tiny_cfg(*overrides, f"output_dir={tmp_path / 'b'}")
    first = Trainer(cfg)
    die_after_logging(first, 4)  # after logging 4, before its checkpoint (every 3)
    assert read_checkpoint(checkpoints_newest_first(tmp_path / "b")[0])["iteration"] == 3

    resumed = Trainer(cfg)
    assert resumed.resume()
    assert resumed.iteration == 3
    resumed.train()
    for (name, a), b in zip(
        uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()
    ):
        assert torch.equal(a, b), name
    losses = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in "ab"]
    final_a = [r["loss"] for r in losses[0] if "loss" in r]
    final_b = [r["loss"] for r in losses[1] if "loss" in r]
    assert final_a == final_b  # the same loss at every logged iteration, none logged twice
    assert [r["iteration"] for r in losses[0]] == [r["iteration"] for r in losses[1]]
    assert [r for r in losses[0] if "panoptic/PQ" in r] == [
        r for r in losses[1] if "panoptic/PQ" in r
    ]


def test_accumulation_must_divide_the_batch(tiny_cfg):
    assert accumulation_steps(tiny_cfg(), world=1) == 2
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_steps(tiny_cfg("solver.batch_size=6", "solver.batch_size_per_device=4"), 1)


@pytest.mark.parametrize(
    "model", [[], ["model.name=pmt", "model.frozen_blocks=-1"]], ids=["eomt", "pmt_frozen"]
)
def test_overfits_a_few_images(tiny_cfg, tmp_path, model):
    root = tmp_path / "four_images"
    generate_synthetic_dataset(root, num_train=4, num_val=1, seed=5)
    cfg = tiny_cfg(
        f"dataset.root={root}",
        "dataset.test_split=train",  # evaluated on the very images it trained on
        "model.backbone_kwargs={embed_dim: 64, depth: 3, num_heads: 2}",
        "solver.max_iter=150",
        "solver.batch_size=4",
        "solver.batch_size_per_device=4",
        "solver.warmup_iters=[10, 10]",
        "input.scale_range=[1.0, 1.0]",
        "checkpoint_period=1000",
        "log_period=10",
        "test.metrics=[panoptic, semantic, instance]",
        "test.save_panoptic=true",
        "test.pq_workers=1",
        *model,
    )
    results = Trainer(cfg).train()
    # Predictions also written in the COCO panoptic format, one PNG per image.
    written = json.load(open(f"{cfg.output_dir}/panoptic/predictions.json"))
    assert len(written["annotations"]) == 4
    assert len(list((tmp_path / "run" / "panoptic" / "predictions").glob("*.png"))) == 4
    records = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.25 * losses[0]
    assert results["panoptic"]["PQ"] > 60
    assert results["semantic"]["mIoU"] > 60
    assert set(results) == {"panoptic", "semantic", "instance"}
    # The trainer's checkpoint is enough to predict with.
    predictor = Predictor.from_checkpoint(f"{cfg.output_dir}/model_0000150.pth")
    image = torch.rand(3, 50, 70)
    segmentation, segments = predictor(image, "panoptic")
    assert segmentation.shape == (50, 70)
    assert predictor(image, "semantic").shape == (50, 70)
    assert predictor(image, "instance")["masks"].shape[1:] == (50, 70)


def test_command_line_train_then_eval_only(tiny_cfg, tmp_path, capsys):
    from tools import train_net

    cfg = tiny_cfg("solver.max_iter=2")
    config_file = tmp_path / "tiny.yaml"
    OmegaConf.save(cfg, config_file)
    train_net.main(train_net.parse_args(["--config-file", str(config_file)]))
    trained = capsys.readouterr().out.strip().splitlines()[-1]
    assert trained.startswith("PQ ")
    eval_only = ["--config-file", str(config_file), "--eval-only"]
    train_net.main(
        train_net.parse_args([*eval_only, f"model.weights={cfg.output_dir}/model_0000002.pth"])
    )
    assert capsys.readouterr().out.strip().splitlines()[-1] == trained
    with pytest.raises(ValueError, match="unknown config key 'solver.lrr'"):
        train_net.main(train_net.parse_args([*eval_only, "solver.lrr=1"]))


@pytest.mark.parametrize("frozen", [0, -1])
def test_a_dense_head_trains_and_evaluates_through_the_trainer(tiny_cfg, frozen):
    cfg = tiny_cfg(
        "task=semantic",
        "dataset.name=synthetic_semantic",
        "model.name=dense",
        "dense.head=mlp",
        "test.metrics=[semantic]",
        f"model.frozen_blocks={frozen}",
    )
    trainer = Trainer(cfg)
    assert trainer.annealing is None  # nothing to anneal, whatever model.masked_attn says
    backbone_before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}
    results = trainer.train()
    assert 0 <= results["semantic"]["mIoU"] <= 100
    records = [json.loads(line) for line in open(f"{cfg.output_dir}/metrics.jsonl")]
    assert all(r["loss_ce"] > 0 for r in records if "loss_ce" in r)
    backbone = trainer.model.backbone.state_dict()
    same = [torch.equal(backbone[k], v) for k, v in backbone_before.items()]
    assert all(same) if frozen == -1 else not all(same)
    head = trainer.model.head.state_dict()
    assert not all(torch.equal(head[k], v) for k, v in head_before.items())
    predictor = Predictor.from_checkpoint(f"{cfg.output_dir}/model_0000006.pth")
    assert predictor(torch.rand(3, 50, 70), "semantic").shape == (50, 70)
    with pytest.raises(ValueError, match="semantic task gives semantic results only"):
        predictor(torch.rand(3, 50, 70), "panoptic")


def test_a_dense_head_needs_the_semantic_task(tiny_cfg):
    with pytest.raises(ValueError, match="model.name 'dense' predicts a class per pixel"):
        Trainer(tiny_cfg("model.name=dense"))


def test_time_per_iter_is_the_mean_of_the_last_interval(tiny_cfg, monkeypatch):
    """Iterations 1-2 take no time, 3-4 take 0.2 s each: the second record says 0.2 s, where a
    mean since the start would say 0.1 s."""
    import time

    trainer = Trainer(tiny_cfg("solver.max_iter=4", "log_period=2", "checkpoint_period=100"))

    def step(self, forward, model, loader, accumulation):
        if self.iteration >= 2:
            time.sleep(0.2)
        return {"loss": 1.0}

    monkeypatch.setattr(Trainer, "_step", step)
    monkeypatch.setattr(Trainer, "test", lambda self, *args, **kwargs: {})
    trainer.train()
    records = [json.loads(line) for line in open(trainer.output_dir / "metrics.jsonl")]
    first, second = (r["time_per_iter"] for r in records if "time_per_iter" in r)
    assert first < 0.05 and 0.2 <= second < 0.3
