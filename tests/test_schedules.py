import pytest
import torch

from eomt.engine.annealing import MaskAnnealing, default_anneal_steps
from eomt.engine.solver import (
    backbone_lr_scale,
    build_lr_scheduler,
    build_optimizer,
    lr_factor,
)
from tests.test_model import tiny_eomt


def test_default_anneal_steps_match_the_paper_configs():
    # COCO ViT-L, 12 epochs of 7391 iterations.
    assert default_anneal_steps(88692, 4) == (
        [14782, 29564, 44346, 59128],
        [29564, 44346, 59128, 73910],
    )
    assert default_anneal_steps(88692, 3) == ([14782, 36955, 59128], [29564, 51737, 73910])
    assert default_anneal_steps(88692, 5)[0] == [14782, 25869, 36955, 48042, 59128]
    assert default_anneal_steps(39120, 4) == (
        [6520, 13040, 19560, 26080],
        [13040, 19560, 26080, 32600],
    )


def test_annealing_values_at_start_midpoint_end():
    annealing = MaskAnnealing([100, 200], [200, 300], power=0.9)
    assert annealing.probs(0) == [1.0, 1.0]
    assert annealing.probs(99) == [1.0, 1.0]
    assert annealing.probs(100) == [1.0, 1.0]  # progress 0
    assert annealing.probs(150) == pytest.approx([0.5**0.9, 1.0])
    assert annealing.probs(200) == [0.0, 1.0]
    assert annealing.probs(250) == pytest.approx([0.0, 0.5**0.9])
    assert annealing.probs(300) == [0.0, 0.0]


def test_annealing_rejects_bad_steps():
    with pytest.raises(ValueError, match="after its start"):
        MaskAnnealing([10], [10])


def test_warmup_and_poly_boundaries():
    args = dict(max_iter=2500, warmup_iters=(500, 1000), power=0.9)
    # New parameters: linear warm-up over the first 500 iterations, then poly decay.
    assert lr_factor(0, is_backbone=False, **args) == 0.0
    assert lr_factor(250, is_backbone=False, **args) == 0.5
    assert lr_factor(500, is_backbone=False, **args) == 1.0
    assert lr_factor(1500, is_backbone=False, **args) == pytest.approx(0.5**0.9)
    assert lr_factor(2500, is_backbone=False, **args) == 0.0
    # Backbone: 0 during the first stage, warm-up over the next 1000, then poly decay.
    assert lr_factor(499, is_backbone=True, **args) == 0.0
    assert lr_factor(500, is_backbone=True, **args) == 0.0
    assert lr_factor(1000, is_backbone=True, **args) == 0.5
    assert lr_factor(1500, is_backbone=True, **args) == 1.0
    assert lr_factor(2000, is_backbone=True, **args) == pytest.approx(0.5**0.9)
    assert lr_factor(2500, is_backbone=True, **args) == 0.0


def test_layerwise_lr_decay_scales():
    assert backbone_lr_scale("blocks.23.attn.qkv.weight", 24, 0.8) == 1.0
    assert backbone_lr_scale("blocks.0.mlp.fc1.weight", 24, 0.8) == pytest.approx(0.8**23)
    assert backbone_lr_scale("pos_embed", 24, 0.8) == pytest.approx(0.8**23)
    assert backbone_lr_scale("norm.weight", 24, 0.8) == 1.0


def test_optimizer_groups_and_scheduler_lrs():
    model = tiny_eomt()  # 3 blocks
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, llrd=0.5)
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[id(p)] = (group["lr"], group["is_backbone"])
    assert lr_of[id(model.queries.weight)] == (1e-4, False)
    assert lr_of[id(model.backbone.blocks[2].attn.qkv.weight)] == (1e-4, True)
    assert lr_of[id(model.backbone.blocks[0].attn.qkv.weight)] == (pytest.approx(0.25e-4), True)
    assert lr_of[id(model.backbone.pos_embed)] == (pytest.approx(0.25e-4), True)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    scheduler = build_lr_scheduler(optimizer, max_iter=30, warmup_iters=(10, 10), power=0.9)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = {g["is_backbone"]: g["lr"] for g in optimizer.param_groups if g["lr"] or True}
    assert lrs[False] == pytest.approx(0.5e-4)  # halfway through its warm-up
    assert all(g["lr"] == 0 for g in optimizer.param_groups if g["is_backbone"])
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    torch.testing.assert_close(model.attn_mask_probs, torch.ones(2))
