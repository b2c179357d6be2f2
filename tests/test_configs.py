"""Every shipped config loads, and the paper's configs carry the paper's values."""

from pathlib import Path

import pytest
import torch

from eomt.config import get_cfg
from eomt.engine.annealing import MaskAnnealing
from eomt.modeling import build_model, count_trainable
from eomt.report import paper_row
from eomt.sweep import load_sweep

# Model configs; configs/sweeps/ holds sweep files and paper_results.yaml the paper's numbers.
CONFIGS = sorted(
    str(p)
    for p in Path("configs").rglob("*.yaml")
    if p.parent.name != "sweeps" and p.name != "paper_results.yaml"
)
SWEEPS = sorted(str(p) for p in Path("configs/sweeps").glob("*.yaml"))

# (config, task, classes, queries, L2, input, iterations, anneal starts, anneal ends): the
# official configs' values (shared/paper_tables.md, section 6).
COCO_L = ([14782, 29564, 44346, 59128], [29564, 44346, 59128, 73910])
COCO_SB_2X = ([29564, 73910, 118256], [59128, 103474, 147820])
COCO_G = ([14782, 25869, 36955, 48042, 59128], [29564, 40651, 51737, 62824, 73910])
ADE_L = ([6520, 13040, 19560, 26080], [13040, 19560, 26080, 32600])
ADE_G = ([6520, 11410, 16300, 21190, 26080], [13040, 17930, 22820, 27710, 32600])
CITYSCAPES = ([3317, 6634, 9951, 13268], [6634, 9951, 13268, 16585])
PAPER = [
    ("coco/panoptic/eomt_large_640", "panoptic", 133, 200, 4, 640, *COCO_L),
    ("coco/panoptic/eomt_large_1280", "panoptic", 133, 200, 4, 1280, *COCO_L),
    ("coco/panoptic/eomt_giant_640", "panoptic", 133, 200, 5, 640, *COCO_G),
    ("coco/panoptic/eomt_small_640_2x", "panoptic", 133, 200, 3, 640, *COCO_SB_2X),
    ("coco/panoptic/eomt_base_640_2x", "panoptic", 133, 200, 3, 640, *COCO_SB_2X),
    ("coco/instance/eomt_large_640", "instance", 80, 200, 4, 640, *COCO_L),
    ("ade20k/panoptic/eomt_large_640", "panoptic", 150, 200, 4, 640, *ADE_L),
    ("ade20k/panoptic/eomt_giant_1280", "panoptic", 150, 200, 5, 1280, *ADE_G),
    ("ade20k/semantic/eomt_large_512", "semantic", 150, 100, 4, 512, *ADE_L),
    ("cityscapes/semantic/eomt_large_1024", "semantic", 19, 100, 4, 1024, *CITYSCAPES),
]


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_loads(path):
    cfg = get_cfg(path)
    assert cfg.solver.batch_size % cfg.solver.batch_size_per_device == 0
    assert cfg.task in cfg.test.metrics


@pytest.mark.parametrize("name, task, classes, queries, blocks, size, starts, ends", PAPER)
def test_paper_configs(name, task, classes, queries, blocks, size, starts, ends):
    cfg = get_cfg(f"configs/{name}.yaml")
    assert (cfg.task, cfg.model.num_classes, cfg.model.num_queries) == (task, classes, queries)
    assert cfg.model.num_query_blocks == blocks
    assert list(cfg.input.image_size) == [size, size]
    assert cfg.solver.batch_size == 16 and cfg.model.patch_size == 16
    annealing = MaskAnnealing.from_cfg(cfg, cfg.model.num_query_blocks)
    assert (annealing.starts, annealing.ends) == (starts, ends)


@pytest.mark.parametrize(
    "name, millions",
    [
        ("coco/panoptic/eomt_small_640", 24),
        ("coco/panoptic/eomt_base_640", 93),
        ("coco/panoptic/eomt_large_640", 316),
        ("coco/panoptic/eomt_giant_640", 1164),
        ("coco/panoptic/ablation/step0_vit_adapter_m2f", 349),
        ("coco/panoptic/ablation/step1_no_adapter", 342),
        ("coco/panoptic/ablation/step2_no_pixel_decoder", 337),
        ("coco/panoptic/ablation/step3_no_multi_scale", 328),
        ("coco/panoptic/m2f_vit_adapter_small_640", 47),
        ("coco/panoptic/m2f_vit_adapter_base_640", 121),
        ("coco/panoptic/m2f_vit_adapter_giant_640", 1209),
    ],
)
def test_parameter_counts_match_the_paper(name, millions):
    cfg = get_cfg(f"configs/{name}.yaml", ["model.pretrained=false"])
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_model(cfg)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == pytest.approx(millions, abs=1)


@pytest.mark.parametrize(
    "name, total, trainable",
    [
        # PMT: the new blocks, fusion and heads train; the frozen DINOv3 encoder does not.
        ("coco/panoptic/pmt_large_640", 357.0, 53.9),
        ("coco/panoptic/pmt_small_640", 29.3, 7.7),
        ("ade20k/semantic/pmt_large_512", 356.9, 53.9),
        ("ade20k/semantic/pmt_small_512", 29.2, 7.7),
        # Dense heads fine-tune the whole ViT-L (304.4M with the linear head's 0.15M).
        ("ade20k/semantic/dense_linear_large_512", 304.4, 304.4),
        ("ade20k/semantic/dense_mlp_large_512", 310.3, 310.3),
        ("ade20k/semantic/dense_unet_large_512", 310.3, 310.3),
        ("ade20k/semantic/dense_dpt_large_512", 335.4, 335.4),
        ("cityscapes/semantic/dense_unet_large_1024", 313.5, 313.5),
        ("cityscapes/semantic/eomt_large_1024_categories", 319.0, 319.0),
    ],
)
def test_head_configs_build_with_their_trainable_parameters(name, total, trainable):
    cfg = get_cfg(f"configs/{name}.yaml", ["model.pretrained=false"])
    with torch.device("meta"):
        model = build_model(cfg)
    counts = count_trainable(model)
    assert round(sum(counts) / 1e6, 1) == total and round(counts[0] / 1e6, 1) == trainable


@pytest.mark.parametrize("path", SWEEPS)
def test_every_sweep_expands_into_runs_whose_configs_load(path):
    runs = load_sweep(path)
    assert runs and len({run.name for run in runs}) == len(runs)
    for run in runs:
        cfg = get_cfg(run.config, run.overrides)
        assert cfg.task in cfg.test.metrics
        if run.paper:
            assert paper_row(run.paper)  # every named paper row exists
