"""Resume, eval-only and fine-tuning never pretend: a run that would start from nothing, or
evaluate a model that loaded nothing, stops and says why, and a run never writes over another's
checkpoints."""

import json

import pytest
from omegaconf import OmegaConf

from eomt.engine.trainer import Trainer
from eomt.weights.files import read_checkpoint, save_weights
from tools import train_net


def trained(tiny_cfg, *overrides) -> Trainer:
    trainer = Trainer(tiny_cfg("solver.max_iter=3", *overrides))
    trainer.train()
    return trainer


def test_resume_with_only_unreadable_checkpoints_stops_listing_each(tiny_cfg, tmp_path):
    run = trained(tiny_cfg)
    checkpoint = run.output_dir / "model_0000003.pth"
    content = checkpoint.read_bytes()
    checkpoint.write_bytes(content[: len(content) // 2])
    (run.output_dir / "model_0000001.pth").write_bytes(b"")
    resumed = Trainer(tiny_cfg("solver.max_iter=6"))
    with pytest.warns(UserWarning), pytest.raises(ValueError) as error:
        resumed.resume()
    message = str(error.value)
    assert message.startswith(f"cannot resume: no checkpoint in {run.output_dir} can be read:")
    assert "model_0000003.pth: truncated or not a checkpoint (" in message
    assert "model_0000001.pth: truncated or not a checkpoint (the file is empty)" in message
    assert "to start from iteration 0" in message
    with pytest.raises(FileExistsError):  # nor does a fresh run write over them
        resumed.train()
    assert checkpoint.read_bytes() == content[: len(content) // 2]  # left as it was


def test_resume_without_checkpoint_says_it_starts_at_zero(tiny_cfg, capsys):
    trainer = Trainer(tiny_cfg())
    assert not trainer.resume()
    assert "to resume: starting at iteration 0" in capsys.readouterr().out
    assert trainer.iteration == 0


def test_fresh_run_into_another_runs_folder_stops(tiny_cfg):
    run = trained(tiny_cfg)
    config, results = (
        (run.output_dir / "config.yaml").read_text(),
        (run.output_dir / "results.json").read_text(),
    )
    with pytest.raises(
        FileExistsError,
        match=r"holds the checkpoints of another run \(model_0000003.pth\): use --resume to "
        r"continue it, or another output_dir",
    ):
        Trainer(tiny_cfg("solver.lr=0.5")).train()
    assert (run.output_dir / "config.yaml").read_text() == config
    assert (run.output_dir / "results.json").read_text() == results


def test_resume_onto_another_architecture_names_the_file_and_groups(tiny_cfg):
    run = trained(tiny_cfg)
    other = Trainer(tiny_cfg("model.num_queries=5", "solver.max_iter=6"))
    with pytest.raises(ValueError) as error:
        other.resume()
    message = str(error.value)
    assert message.startswith(f"{run.output_dir / 'model_0000003.pth'}: does not match the model")
    assert "queries: 1 wrong shape: queries.weight: file (8, 32), model (5, 32)" in message


def test_eval_only_needs_weights_unless_random_on_purpose(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg()
    config_file = tmp_path / "tiny.yaml"
    OmegaConf.save(cfg, config_file)
    eval_only = ["--config-file", str(config_file), "--eval-only"]
    with pytest.raises(ValueError, match="evaluation needs trained weights: set model.weights"):
        train_net.main(train_net.parse_args(eval_only))
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {cfg.output_dir} to evaluate"):
        train_net.main(train_net.parse_args([*eval_only, "--resume"]))
    capsys.readouterr()
    train_net.main(train_net.parse_args([*eval_only, "model.weights=random"]))
    out = capsys.readouterr().out
    assert "evaluating the initialised model, without trained weights" in out
    assert out.strip().splitlines()[-1].startswith("PQ ")


def test_eval_only_resume_evaluates_the_last_checkpoint(tiny_cfg, capsys):
    run = trained(tiny_cfg)
    final = capsys.readouterr().out.strip().splitlines()[-1]
    Trainer(tiny_cfg()).eval_only(resume=True)
    out = capsys.readouterr().out
    assert "resumed from" in out and out.strip().splitlines()[-1] == final
    assert read_checkpoint(run.output_dir / "model_0000003.pth")["iteration"] == 3


def test_eval_only_of_a_checkpoint_logs_it_at_its_iteration(tiny_cfg, tmp_path):
    run = trained(tiny_cfg)
    weights = run.output_dir / "model_0000003.pth"
    evaluation = tmp_path / "evaluation"
    Trainer(tiny_cfg(f"model.weights={weights}", f"output_dir={evaluation}")).eval_only()
    records = [json.loads(line) for line in (evaluation / "metrics.jsonl").read_text().splitlines()]
    assert records and {record["iteration"] for record in records} == {3}
    assert json.loads((evaluation / "finished.json").read_text())["iteration"] == 3


def test_fine_tuning_reports_what_loaded_and_refuses_an_unrelated_checkpoint(
    tiny_cfg, tmp_path, capsys
):
    run = trained(tiny_cfg)
    weights = f"model.weights={run.output_dir / 'model_0000003.pth'}"
    capsys.readouterr()
    # Another class count (7 -> the same, queries 8 -> 5): the queries are new.
    Trainer(
        tiny_cfg(
            weights,
            "model.weights_strict=false",
            "model.num_queries=5",
            f"output_dir={tmp_path / 'tune'}",
        )
    )
    out = capsys.readouterr().out
    own = Trainer(tiny_cfg("model.num_queries=5", f"output_dir={tmp_path / 'count'}"))
    total = len(own.model.state_dict())
    assert f"loaded {total - 1} of {total} tensors; kept their initialisation" in out
    assert "queries: 1 wrong shape: queries.weight: file (8, 32), model (5, 32)" in out

    # A checkpoint of a wider ViT shares nothing but the image statistics: refused.
    wide = Trainer(
        tiny_cfg(
            "model.backbone_kwargs={embed_dim: 64, depth: 3, num_heads: 2}",
            f"output_dir={tmp_path / 'wide'}",
        )
    )
    path = save_weights(wide.model, wide.cfg, wide.categories, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError) as error:
        Trainer(
            tiny_cfg(
                f"model.weights={path}",
                "model.weights_strict=false",
                f"output_dir={tmp_path / 'refused'}",
            )
        )
    message = str(error.value)
    assert "none of the backbone's blocks match this model" in message
    assert "so it is not a checkpoint of this architecture" in message
    assert (
        "backbone.blocks: 36 wrong shape: backbone.blocks.0.attn.proj.bias: file (64,)" in message
    )
    assert "only 4 of 59 tensors would load" in message  # statistics, probabilities, class bias
