"""Mask2Former and the ladder from ViT-Adapter + Mask2Former to EoMT (the paper's Table 1)."""

import pytest
import torch

from eomt.config import get_cfg
from eomt.engine.solver import build_optimizer
from eomt.engine.trainer import Trainer
from eomt.modeling import EoMT, Mask2Former, build_model, build_vit
from eomt.modeling.criterion import MaskClassificationLoss
from eomt.modeling.mask2former import MaskedTransformerDecoder, sine_position_embedding

NUM_CLASSES = 5
NUM_QUERIES = 6
SIZE = 64  # 1/4: 16 x 16, 1/8: 8 x 8, 1/16: 4 x 4, 1/32: 2 x 2
TINY = dict(hidden_dim=32, num_heads=4, dim_feedforward=64, enc_layers=2, enc_dim_feedforward=64)
STEPS = {
    "step0_vit_adapter": dict(adapter="vit_adapter", pixel_decoder="msdeform", multi_scale=True),
    "step1_simple_pyramid": dict(
        adapter="simple_pyramid", pixel_decoder="msdeform", multi_scale=True
    ),
    "step2_no_pixel_decoder": dict(
        adapter="simple_pyramid", pixel_decoder="none", multi_scale=True
    ),
    "step3_single_scale": dict(adapter="simple_pyramid", pixel_decoder="none", multi_scale=False),
}


def tiny_vit():
    return build_vit(
        "vit_small_patch14_reg4_dinov2",
        (SIZE, SIZE),
        16,
        embed_dim=32,
        depth=4,
        num_heads=2,
    )


def tiny_m2f(step: str, masked_attn: str = "always", dec_layers: int = 9) -> Mask2Former:
    torch.manual_seed(0)
    return Mask2Former(
        tiny_vit(),
        NUM_CLASSES,
        NUM_QUERIES,
        masked_attn=masked_attn,
        dec_layers=dec_layers,
        deform_points=2,
        **STEPS[step],
        **TINY,
    )


@pytest.mark.parametrize("step", STEPS)
def test_ladder_outputs_one_prediction_before_and_after_every_layer(step):
    model = tiny_m2f(step).eval()
    with torch.no_grad():
        predictions = model(torch.rand(2, 3, SIZE, SIZE))
    assert len(predictions) == 10
    for prediction in predictions:
        assert prediction["mask_logits"].shape == (2, NUM_QUERIES, SIZE // 4, SIZE // 4)
        assert prediction["class_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
        assert torch.isfinite(prediction["mask_logits"]).all()


def test_without_masked_attention_only_the_final_prediction():
    model = tiny_m2f("step2_no_pixel_decoder", masked_attn="never").eval()
    with torch.no_grad():
        predictions = model(torch.rand(1, 3, SIZE, SIZE))
    assert len(predictions) == 1
    assert predictions[0]["mask_logits"].shape == (1, NUM_QUERIES, SIZE // 4, SIZE // 4)


def cross_attention_key_counts(model: Mask2Former) -> list[int]:
    """Number of keys each decoder layer's cross-attention reads in one forward."""
    counts = []
    hooks = [
        layer.cross_attn.register_forward_pre_hook(lambda _, args: counts.append(args[1].shape[1]))
        for layer in model.decoder.layers
    ]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, SIZE, SIZE))
    for hook in hooks:
        hook.remove()
    return counts


def test_decoder_reads_levels_round_robin_from_the_coarsest():
    # 1/32: 2 x 2 = 4 keys, 1/16: 16, 1/8: 64.
    assert cross_attention_key_counts(tiny_m2f("step0_vit_adapter")) == [4, 16, 64] * 3
    assert cross_attention_key_counts(tiny_m2f("step2_no_pixel_decoder")) == [4, 16, 64] * 3
    assert cross_attention_key_counts(tiny_m2f("step3_single_scale")) == [16] * 9


def test_attention_mask_blocks_below_one_half_and_opens_empty_masks():
    decoder = MaskedTransformerDecoder(NUM_CLASSES, dim=8, num_queries=3, num_heads=2)
    logits = torch.full((2, 3, 2, 2), -1.0)
    logits[0, 1] = torch.tensor([[2.0, -3.0], [0.0, -0.1]])  # sigmoid(0) = 0.5 is not blocked
    logits[1, 2] = 1.0
    blocked = decoder.attention_mask(logits, (2, 2))
    assert blocked.shape == (2 * 2, 3, 4)  # (batch * heads, queries, keys)
    expected = torch.zeros(2, 3, 4, dtype=torch.bool)
    expected[0, 1] = torch.tensor([False, True, False, True])
    # Every other mask is empty (all logits -1): those queries attend everywhere.
    for head in range(2):
        assert torch.equal(blocked[0 * 2 + head], expected[0])
        assert torch.equal(blocked[1 * 2 + head], expected[1])
    # The masks are resized to the level first (bilinearly): 4 x 4 logits -> 2 x 2 keys.
    fine = torch.tensor([[3.0, 3.0, -3.0, -3.0]]).repeat(4, 1)[None, None].expand(1, 3, 4, 4)
    assert torch.equal(
        decoder.attention_mask(fine, (2, 2))[0, 0], torch.tensor([False, True, False, True])
    )


def test_all_blocked_masks_give_the_unmasked_decoder():
    """When every predicted mask is empty, every query attends everywhere: the masked decoder
    then computes exactly what the decoder without masks computes."""
    torch.manual_seed(0)
    masked = MaskedTransformerDecoder(NUM_CLASSES, dim=16, num_queries=4, num_heads=2)
    unmasked = MaskedTransformerDecoder(
        NUM_CLASSES, dim=16, num_queries=4, num_heads=2, masked_attn=False
    )
    with torch.no_grad():
        masked.mask_head[-1].weight.zero_()
        masked.mask_head[-1].bias.fill_(1.0)
    unmasked.load_state_dict(masked.state_dict())
    features = [torch.randn(2, 16, s, s) for s in (2, 4, 8)]
    mask_features = -torch.ones(2, 16, 16, 16)  # every mask logit is -16
    with torch.no_grad():
        with_masks = masked(features, mask_features)
        without = unmasked(features, mask_features)
    assert len(with_masks) == 10 and len(without) == 1
    assert (with_masks[0]["mask_logits"] < 0).all()
    torch.testing.assert_close(with_masks[-1]["class_logits"], without[-1]["class_logits"])


def test_sine_position_embedding_by_hand():
    embedding = sine_position_embedding(2, 3, 4, "cpu").view(2, 3, 4)
    # 2 features per axis, frequencies 1 and 1: (sin, cos) of 2*pi*row/height, then of columns.
    row = 2 * torch.pi * torch.tensor([1.0, 2.0]) / 2
    col = 2 * torch.pi * torch.tensor([1.0, 2.0, 3.0]) / 3
    torch.testing.assert_close(
        embedding[1, 2], torch.stack([row[1].sin(), row[1].cos(), col[2].sin(), col[2].cos()])
    )
    torch.testing.assert_close(embedding[0, :, :2], embedding[0, :1, :2].expand(3, 2))


def tiny_targets(batch: int):
    targets = []
    for b in range(batch):
        masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
        masks[0, : SIZE // 2] = True
        masks[1, SIZE // 2 :, b * 8 :] = True
        targets.append(
            {
                "masks": masks,
                "labels": torch.tensor([1, 3]),
                "is_crowd": torch.zeros(2, dtype=torch.bool),
            }
        )
    return targets


@pytest.mark.parametrize("step", STEPS)
def test_training_step_reaches_every_parameter(step):
    model = tiny_m2f(step, dec_layers=3).train()
    criterion = MaskClassificationLoss(NUM_CLASSES, num_points=64)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, llrd=0.8)
    vit_before = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    losses = criterion(model(torch.rand(2, 3, SIZE, SIZE)), tiny_targets(2))
    assert len([k for k in losses if k.startswith("loss_class_")]) == 4
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, vit_before)


def test_trainer_trains_and_evaluates_mask2former(tiny_cfg):
    cfg = tiny_cfg(
        "model.name=m2f",
        "model.masked_attn=always",
        "model.patch_size=16",
        "m2f.adapter=simple_pyramid",
        "m2f.hidden_dim=32",
        "m2f.num_heads=4",
        "m2f.dec_layers=3",
        "m2f.dim_feedforward=64",
        "m2f.enc_layers=1",
        "m2f.enc_dim_feedforward=64",
        "solver.max_iter=2",
    )
    results = Trainer(cfg).train()
    assert 0 <= results["panoptic"]["PQ"] <= 100


# Parameters (millions) in the paper: Table 1 (steps), Table 2 (sizes), Table 3 (pre-training).
PAPER_PARAMS = [
    ("ablation/step0_vit_adapter_m2f", 349),
    ("ablation/step1_no_adapter", 342),
    ("ablation/step2_no_pixel_decoder", 337),
    ("ablation/step3_no_multi_scale", 328),
    ("ablation/step4_no_transformer_decoder", 316),
    ("ablation/step5_no_masking", 316),
    ("m2f_vit_adapter_small_640", 47),
    ("m2f_vit_adapter_base_640", 121),
    ("m2f_vit_adapter_large_640", 349),
    ("m2f_vit_adapter_giant_640", 1209),
    ("eomt_small_640_masking", 24),
    ("eomt_base_640_masking", 93),
    ("eomt_large_640_masking", 316),
    ("eomt_giant_640_masking", 1164),
    *[
        (f"pretraining/{pretraining}_{model}_large_640", millions)
        for pretraining in ("eva02", "deit3_in21k", "deit3_in1k")
        for model, millions in (("eomt", 316), ("eomt_masking", 316), ("m2f_vit_adapter", 349))
    ],
]


@pytest.mark.parametrize("name, millions", PAPER_PARAMS)
def test_configs_match_the_paper_parameter_counts(name, millions):
    cfg = get_cfg(f"configs/coco/panoptic/{name}.yaml", ["model.pretrained=false"])
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(millions * 1e6, rel=0.02)
    # Masked attention at inference: Mask2Former, step 4 and the "w/ masking" EoMT rows.
    masking = cfg.model.name == "m2f" or "step4" in name or "eomt_masking" in name
    masking |= name.endswith("_640_masking")
    assert cfg.model.masked_attn == ("always" if masking else "anneal")


def test_ladder_configs_remove_one_component_per_step():
    options = []
    for name in ("step0_vit_adapter_m2f", "step1_no_adapter", "step2_no_pixel_decoder"):
        m2f = get_cfg(f"configs/coco/panoptic/ablation/{name}.yaml").m2f
        options.append((m2f.adapter, m2f.pixel_decoder, m2f.multi_scale))
    step3 = get_cfg("configs/coco/panoptic/ablation/step3_no_multi_scale.yaml").m2f
    options.append((step3.adapter, step3.pixel_decoder, step3.multi_scale))
    assert options == [
        ("vit_adapter", "msdeform", True),
        ("simple_pyramid", "msdeform", True),
        ("simple_pyramid", "none", True),
        ("simple_pyramid", "none", False),
    ]


def test_build_model_dispatch_and_bad_options():
    tiny = [
        "model.pretrained=false",
        "model.backbone=vit_small_patch14_reg4_dinov2",
        "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
        "input.image_size=[64, 64]",
        "model.num_classes=7",
        "model.num_queries=5",
        "m2f.hidden_dim=32",
        "m2f.num_heads=4",
    ]
    eomt = build_model(get_cfg(overrides=[*tiny, "model.num_query_blocks=2"]))
    assert isinstance(eomt, EoMT)
    m2f = build_model(get_cfg(overrides=[*tiny, "model.name=m2f", "model.masked_attn=always"]))
    assert isinstance(m2f, Mask2Former)
    assert m2f.decoder.class_head.out_features == 8
    assert m2f.decoder.query_feat.weight.shape == (5, 32)
    assert m2f.backbone is m2f.features.vit
    with pytest.raises(
        ValueError, match="'model.name' must be one of eomt, m2f, pmt, dense, videomt; got 'detr'"
    ):
        get_cfg(overrides=[*tiny, "model.name=detr"])
    cfg = get_cfg(overrides=tiny)
    cfg.model.name = "detr"  # set after the config was checked
    with pytest.raises(ValueError, match="model.name 'detr'"):
        build_model(cfg)
    with pytest.raises(ValueError, match="'anneal' is not available with model.name 'm2f'"):
        build_model(get_cfg(overrides=[*tiny, "model.name=m2f"]))
    with pytest.raises(ValueError, match="adapter must be one of"):
        Mask2Former(tiny_vit(), 3, adapter="fpn", **TINY)
    with pytest.raises(ValueError, match="multi_scale=False needs pixel_decoder 'none'"):
        Mask2Former(tiny_vit(), 3, multi_scale=False, **TINY)
    with pytest.raises(ValueError, match="2 decoder layers would leave some of the 3"):
        Mask2Former(tiny_vit(), 3, **{**TINY, "dec_layers": 2})
    with pytest.raises(ValueError, match="divisible by 32"):
        tiny_m2f("step2_no_pixel_decoder")(torch.rand(1, 3, 48, 64))
