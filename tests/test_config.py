import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError

from eomt.config import ConfigError, cfg_from_dict, get_cfg


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_base_inheritance_and_overrides(tmp_path):
    write(
        tmp_path / "base.yaml", "solver:\n  lr: 2.0e-4\n  max_iter: 100\nmodel:\n  num_classes: 5\n"
    )
    child = write(
        tmp_path / "child.yaml", "_BASE_: base.yaml\nsolver:\n  max_iter: 50\ntask: semantic\n"
    )
    cfg = get_cfg(child, ["solver.lr=1e-3", "input.image_size=[64, 32]"])
    assert cfg.solver.max_iter == 50  # child over base
    assert cfg.solver.lr == 1e-3  # override over file; "1e-3" is read as a float
    assert cfg.model.num_classes == 5  # from the base
    assert cfg.task == "semantic"
    assert list(cfg.input.image_size) == [64, 32]
    assert cfg.loss.no_object_weight == 0.1  # untouched default
    assert cfg_from_dict(cfg) == cfg


def test_typo_in_file_names_the_key_and_the_closest(tmp_path):
    bad = write(tmp_path / "bad.yaml", "solver:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'solver.lrr'.*solver.lr"):
        get_cfg(bad)


def test_typo_in_override():
    with pytest.raises(ConfigError, match=r"'model.num_clases'.*model.num_classes"):
        get_cfg(overrides=["model.num_clases=3"])


def test_wrong_type_is_rejected(tmp_path):
    bad = write(tmp_path / "bad.yaml", "solver:\n  max_iter: lots\n")
    with pytest.raises(ConfigError, match=r"'solver.max_iter' expects int.*'lots'"):
        get_cfg(bad)
    with pytest.raises(ConfigError, match="expects bool"):
        get_cfg(overrides=["model.pretrained=3"])


def test_missing_file_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        get_cfg(tmp_path / "absent.yaml")
    write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        get_cfg(tmp_path / "a.yaml")


def test_config_is_frozen_against_new_keys():
    cfg = get_cfg()
    with pytest.raises(ConfigAttributeError):
        cfg.solver.new_key = 1


def test_moved_annealing_keys_still_read_from_files_overrides_and_saved_configs(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  anneal_start: [3, 7]\n  anneal_end: [5, 9]\n")
    cfg = get_cfg(old, ["model.anneal_power=2.0"])
    assert list(cfg.solver.anneal_start) == [3, 7] and list(cfg.solver.anneal_end) == [5, 9]
    assert cfg.solver.anneal_power == 2.0
    assert "anneal_start" not in cfg.model
    saved = OmegaConf.to_container(cfg)
    saved["model"]["anneal_power"] = saved["solver"].pop("anneal_power")  # a checkpoint of before
    assert cfg_from_dict(saved).solver.anneal_power == 2.0


def test_an_item_of_the_backbone_arguments_is_set_without_the_others(tmp_path):
    path = write(tmp_path / "small.yaml", "model:\n  backbone_kwargs: {depth: 6, num_heads: 3}\n")
    cfg = get_cfg(path, ["model.backbone_kwargs.depth=4", "model.backbone_kwargs.mlp_ratio=2.0"])
    assert OmegaConf.to_container(cfg.model.backbone_kwargs) == {
        "depth": 4,
        "num_heads": 3,
        "mlp_ratio": 2.0,
    }
    assert get_cfg(overrides=["model.backbone_kwargs.depth=2"]).model.backbone_kwargs.depth == 2
    with pytest.raises(ConfigError, match="unknown config key 'model.backbon.depth'"):
        get_cfg(overrides=["model.backbon.depth=2"])
