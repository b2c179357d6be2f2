"""PMT (eomt/modeling/pmt.py): the fusion of the taps, its rotary embeddings, a frozen encoder,
and the authors' checkpoint layouts (a Lightning checkpoint and the decoder-only release files)
read back as the same model. The comparison with the authors' code itself is in docs/pmt.md."""

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

import eomt
from eomt.engine.trainer import Trainer
from eomt.modeling import PMT, build_model, build_vit, freeze_blocks
from eomt.weights.files import read_checkpoint
from eomt.weights.layouts import _timm_backbone_to_hf, ours_to_hf, ours_to_official
from tests.test_faults import start

NUM_QUERIES, NUM_CLASSES = 6, 4
DINOV2, DINOV3 = "vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"
SIZE = dict(embed_dim=128, depth=8, num_heads=2)  # heads of 64 channels, as released models
TAPS = [1, 3, 5, 7]  # the authors' choice for 8 blocks: 4 evenly spaced, the last included


def tiny_pmt(backbone=DINOV2, frozen=True, taps=TAPS, weights="", seed=0) -> PMT:
    torch.manual_seed(seed)
    vit = build_vit(backbone, (64, 64), 16, weights=weights, **SIZE)
    if frozen:
        freeze_blocks(vit, -1)
    return PMT(vit, NUM_CLASSES, NUM_QUERIES, num_blocks=2, taps=list(taps), mlp_dim=128)


def randomise_statistics(model: PMT) -> PMT:
    """BatchNorm statistics and the new blocks' layer scales away from their initial values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for norm in model.tap_norms:
            norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
            norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        for block in model.blocks:
            block.gamma_1.mul_(torch.rand(block.gamma_1.shape, generator=generator))
    return model


@pytest.fixture
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def predictions(model, images, masked: bool) -> list[dict]:
    model.eval()
    model.masked_attn = "always" if masked else "anneal"
    model.set_attn_mask_probs([1.0] * model.num_query_blocks)
    with torch.no_grad():
        return model(images)


def assert_same_predictions(a: PMT, b: PMT, images) -> None:
    for masked in (False, True):
        expected, got = predictions(a, images, masked), predictions(b, images, masked)
        assert len(expected) == len(got) == (3 if masked else 1)
        for p, q in zip(expected, got):
            for key in p:
                torch.testing.assert_close(q[key], p[key], rtol=0, atol=1e-5)


def test_taps_pass_the_final_norm_and_batch_norm_then_a_scaled_residual_mlp(images):
    model = randomise_statistics(tiny_pmt()).eval()
    x, _ = eomt.modeling.embed_tokens(model.backbone, (images - model.pixel_mean) / model.pixel_std)
    fused = 0
    for i, block in enumerate(model.backbone.blocks):
        x = block(x)
        if i in TAPS:
            k = TAPS.index(i)
            norm = model.tap_norms[k]
            f = model.backbone.norm(x)
            f = (f - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
            f = f * norm.weight + norm.bias
            fused = fused + (f + model.lateral_mlps[k](f)) * model.lateral_scales[k]
    # The new blocks see [queries, fused tokens]: check the fused tokens through a hook.
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = args[0]

    model.blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        model(images)
    torch.testing.assert_close(seen["x"][:, NUM_QUERIES:], fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["x"][:, :NUM_QUERIES], model.queries.weight.expand(2, -1, -1))


def test_new_blocks_are_dinov3_blocks_with_layer_scale_one():
    model = tiny_pmt()
    for block in model.blocks:
        assert torch.equal(block.gamma_1, torch.ones(128)) and torch.equal(
            block.gamma_2, torch.ones(128)
        )
        assert block.attn.k_bias is not None and not block.attn.k_bias.any()  # no key bias
        assert block.attn.q_bias.abs().max() > 0  # nn.Linear's bias initialisation, as theirs
        assert block.attn.num_prefix_tokens == NUM_QUERIES + model.backbone.num_prefix_tokens
        assert block.mlp.fc1.out_features == 128


def test_frozen_encoder_stays_in_eval_mode_and_gets_no_gradient(images):
    model = tiny_pmt().train()
    assert not model.backbone.training and model.blocks.training and model.tap_norms.training
    model.set_attn_mask_probs([0.5, 1.0])
    outputs = model(images)
    assert len(outputs) == 3
    sum(p["mask_logits"].mean() + p["class_logits"].mean() for p in outputs).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    for param in (model.queries.weight, model.lateral_scales[0], model.blocks[0].attn.qkv.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_a_trainable_encoder_trains_up_to_its_last_tap(images):
    model = tiny_pmt(frozen=False, taps=(0, 2)).train()
    assert model.backbone.training
    sum(p["mask_logits"].mean() for p in model(images)).backward()
    grads = [all(p.grad is not None for p in b.parameters()) for b in model.backbone.blocks]
    assert grads == [True] * 3 + [False] * 5  # blocks 3-7 are never run: frozen, not trained
    assert not any(p.requires_grad for p in model.backbone.blocks[3].parameters())
    assert model.backbone.norm.weight.grad is not None  # every tap goes through the final norm


def test_dinov2_encoder_gets_rotary_embeddings_rescaled_at_random_in_training(images):
    model = tiny_pmt(DINOV2)
    assert model.rope is not None
    model.train()
    first, second = model.rope.get_embed(), model.rope.get_embed()
    assert not torch.equal(first, second)  # coordinates rescaled by a random factor per forward
    model.eval()
    assert torch.equal(model.rope.get_embed(), model.rope.get_embed())
    # The new blocks use it: without it the prediction changes.
    with torch.no_grad():
        with_rope = model(images)[-1]["mask_logits"]
        model.rope.get_embed = lambda: None
        without = model(images)[-1]["mask_logits"]
    assert not torch.allclose(with_rope, without)


def test_dinov3_encoder_lends_its_own_rotary_embeddings():
    model = tiny_pmt(DINOV3)
    assert model.rope is None and model.backbone.rope is not None


def test_taps_are_checked():
    with pytest.raises(ValueError, match="taps"):
        tiny_pmt(taps=(1, 8))
    with pytest.raises(ValueError, match="num_blocks"):
        PMT(build_vit(DINOV2, (64, 64), 16, **SIZE), NUM_CLASSES, num_blocks=0)


def lightning_checkpoint(model: PMT, path, decoder_only=False, compiled=False):
    """Our model in the authors' layouts, through the inverse key map: a Lightning checkpoint
    (weights under state_dict, the loss's class weights beside them; `compiled`: the names
    torch.compile gives), or the release file their convert_ckpt.py writes (no encoder)."""
    state = ours_to_official(model.state_dict())
    state["criterion.empty_weight"] = torch.ones(NUM_CLASSES + 1)
    if decoder_only:
        state = {k: v for k, v in state.items() if not k.startswith("network.encoder.")}
    if compiled:
        state = {k.replace("network.", "network._orig_mod.", 1): v for k, v in state.items()}
    torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize("backbone", [DINOV2, DINOV3])
@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled_names"])
def test_authors_lightning_checkpoint_reads_back_identically(tmp_path, images, backbone, compiled):
    model = randomise_statistics(tiny_pmt(backbone))
    path = lightning_checkpoint(model, tmp_path / "last.ckpt", compiled=compiled)
    loaded = eomt.from_checkpoint(path, image_size=(64, 64))
    assert isinstance(loaded, PMT) and loaded.taps == TAPS
    assert loaded.backbone_frozen
    assert_same_predictions(model, loaded, images)


def test_decoder_only_release_takes_the_dinov2_encoder_from_its_pretrained_file(tmp_path, images):
    # The pretrained file at patch 14 and 56 x 56 (a 4 x 4 grid), as the hub holds DINOv2; the
    # model at patch 16, timm resampling the file (the authors' code builds it so).
    hub = build_vit(DINOV2, (56, 56), 14, **SIZE)
    torch.save(hub.state_dict(), tmp_path / "dinov2.pth")
    model = randomise_statistics(tiny_pmt(DINOV2, weights=str(tmp_path / "dinov2.pth")))
    release = lightning_checkpoint(model, tmp_path / "pytorch_model.bin", decoder_only=True)
    with pytest.raises(ValueError, match="decoder only.*base_weights"):
        eomt.from_checkpoint(release)
    loaded = eomt.from_checkpoint(
        release, base_weights=tmp_path / "dinov2.pth", image_size=(64, 64)
    )
    assert_same_predictions(model, loaded, images)


def test_decoder_only_release_takes_the_dinov3_encoder_from_transformers_file(tmp_path, images):
    model = randomise_statistics(tiny_pmt(DINOV3))
    backbone = _timm_backbone_to_hf(
        model.backbone.state_dict(), "embeddings.", "layer.", "norm.", True
    )
    save_file({k: v.contiguous() for k, v in backbone.items()}, tmp_path / "model.safetensors")
    release = lightning_checkpoint(model, tmp_path / "pytorch_model.bin", decoder_only=True)
    loaded = eomt.from_checkpoint(
        release, base_weights=tmp_path / "model.safetensors", image_size=(64, 64)
    )
    assert_same_predictions(model, loaded, images)
    # Loading into a model built from a config works the same way.
    other = tiny_pmt(DINOV3, seed=7)
    with pytest.raises(ValueError, match="decoder only"):
        eomt.load_checkpoint(other, release)
    eomt.load_checkpoint(other, release, base_weights=tmp_path / "model.safetensors")
    assert_same_predictions(model, other, images)


def test_a_pmt_checkpoint_of_ours_converts_to_their_layout_and_back(tmp_path, images):
    model = randomise_statistics(tiny_pmt(DINOV3))
    state = ours_to_official(model.state_dict())
    assert {k.split(".")[1] for k in state} == {"encoder", "bn", "decoder"}
    assert "network.decoder.blocks.0.attention.q_proj.weight" in state
    assert "network.decoder.blocks.0.layer_scale1.lambda1" in state
    assert "network.decoder.lateral_projections.0.0.weight" in state
    assert "network.decoder.scalers.1" in state and "network.decoder.q.weight" in state
    with pytest.raises(ValueError, match="transformers has no PMT"):
        ours_to_hf(model.state_dict())


# -- training ----------------------------------------------------------------------------------

PMT_OVERRIDES = ["model.name=pmt", "pmt.num_blocks=2", "pmt.mlp_dim=64"]
DENSE_MLP = [
    "model.name=dense",
    "dense.head=mlp",
    "task=semantic",
    "dataset.name=synthetic_semantic",
    "test.metrics=[semantic]",
]


def test_fine_tuning_from_a_decoder_only_release_takes_the_pretrained_encoder(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*PMT_OVERRIDES, "model.frozen_blocks=-1")
    model = randomise_statistics(build_model(cfg))
    encoder = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, encoder)
    release = lightning_checkpoint(model, tmp_path / "pytorch_model.bin", decoder_only=True)
    trainer = Trainer(
        tiny_cfg(*PMT_OVERRIDES, f"model.weights={release}", f"model.backbone_weights={encoder}")
    )
    for key, value in model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="decoder only.*model.backbone_weights"):
        Trainer(tiny_cfg(*PMT_OVERRIDES, f"model.weights={release}"))


def test_accumulating_a_model_with_batch_norm_says_its_statistics_cover_a_micro_batch(tiny_cfg):
    trainer = Trainer(tiny_cfg(*DENSE_MLP, "solver.max_iter=1"))
    with pytest.warns(UserWarning, match="BatchNorm statistics cover 2 images x 1 process"):
        trainer.train()


def test_batch_norm_statistics_span_the_processes(tiny_cfg, tmp_path):
    """A dense head with BatchNorm on a trainable encoder (blocks after its last tap unused),
    2 processes x 2 images under DDP (gloo) against 1 process x 4 images: the same BatchNorm
    statistics after the first step (those of the batch of 4 either way); accumulating 2 x 2
    images in one process gives others."""
    overrides = [*DENSE_MLP, "dense.head=unet", "dense.taps=[0, 1]", "solver.max_iter=1"]
    overrides.append("checkpoint_period=1")
    two = tiny_cfg(*overrides, f"output_dir={tmp_path / 'two'}")
    OmegaConf.save(two, tmp_path / "config.yaml")
    process = start(tmp_path / "config.yaml", "--num-gpus", "2")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    by_two = read_checkpoint(tmp_path / "two" / "model_0000001.pth")["model"]
    for per_device, same in ((4, True), (2, False)):
        run = tmp_path / f"one_{per_device}"
        Trainer(
            tiny_cfg(*overrides, f"solver.batch_size_per_device={per_device}", f"output_dir={run}")
        ).train()
        by_one = read_checkpoint(run / "model_0000001.pth")["model"]
        statistics = [k for k in by_one if k.endswith(("running_mean", "running_var"))]
        assert len(statistics) == 2 * 4  # 2 stages (1/8, 1/4 at patch 8) x 2 convs
        close = [torch.allclose(by_one[k], by_two[k], rtol=1e-5, atol=1e-6) for k in statistics]
        assert all(close) if same else not any(close)


def test_pmt_with_a_trainable_encoder_trains_under_ddp(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        *PMT_OVERRIDES, "model.frozen_blocks=0", "solver.max_iter=2", "checkpoint_period=2"
    )
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    process = start(tmp_path / "config.yaml", "--num-gpus", "2")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    state = read_checkpoint(tmp_path / "run" / "model_0000002.pth")["model"]
    assert state["tap_norms.0.num_batches_tracked"] == 2


def test_transformers_dinov3_file_as_backbone_weights(tmp_path):
    """model.backbone_weights takes the encoder file the authors' code loads (transformers'
    DINOv3): the same weights as timm's; all-zero q/v biases fit a model without them, other
    biases are refused there."""
    kwargs = dict(embed_dim=128, depth=2, num_heads=2)
    source = build_vit("vit_small_patch16_dinov3_qkvb", (64, 64), 16, **kwargs)
    for block in source.blocks:  # timm starts them at zero
        torch.nn.init.normal_(block.attn.q_bias)
        torch.nn.init.normal_(block.attn.v_bias)
    state = _timm_backbone_to_hf(source.state_dict(), "embeddings.", "layer.", "norm.", True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    weights = str(tmp_path / "model.safetensors")
    loaded = build_vit("vit_small_patch16_dinov3_qkvb", (64, 64), 16, weights=weights, **kwargs)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="attn.q_bias is not zero.*_qkvb"):
        build_vit("vit_small_patch16_dinov3", (64, 64), 16, weights=weights, **kwargs)
    for key in state:
        if key.endswith(("q_proj.bias", "v_proj.bias")):
            state[key] = torch.zeros_like(state[key])
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "zero.safetensors")
    plain = build_vit(
        "vit_small_patch16_dinov3",
        (64, 64),
        16,
        weights=str(tmp_path / "zero.safetensors"),
        **kwargs,
    )
    torch.testing.assert_close(plain.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
