import pytest
import torch

from eomt.config import get_cfg
from eomt.engine.solver import build_optimizer
from eomt.modeling import PMT, EoMT, build_model, build_vit, count_trainable, freeze_blocks

NUM_QUERIES, NUM_CLASSES = 6, 4


def tiny_eomt(
    masked_attn="anneal", backbone="vit_small_patch14_reg4_dinov2", blocks=2, kind="eomt"
):
    """A tiny EoMT, or PMT (`kind`): the same rules on new blocks after the fused taps 0 and 2
    of a frozen encoder."""
    vit = build_vit(backbone, img_size=(32, 48), patch_size=8, embed_dim=32, depth=3, num_heads=2)
    if kind == "pmt":
        freeze_blocks(vit, -1)
        return PMT(vit, NUM_CLASSES, NUM_QUERIES, blocks, [0, 2], 64, masked_attn)
    return EoMT(vit, NUM_CLASSES, NUM_QUERIES, num_query_blocks=blocks, masked_attn=masked_attn)


KINDS = pytest.mark.parametrize("kind", ["eomt", "pmt"])


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "mode, training, expected",
    [
        ("anneal", True, 3),  # one before each of the 2 query blocks, then the final one
        ("anneal", False, 1),
        ("always", True, 3),
        ("always", False, 3),
        ("never", True, 1),
        ("never", False, 1),
    ],
)
@KINDS
def test_output_shapes_and_length_per_mode(images, mode, training, expected, kind):
    model = tiny_eomt(mode, kind=kind).train(training)
    predictions = model(images)
    assert len(predictions) == expected
    for prediction in predictions:
        assert prediction["mask_logits"].shape == (2, NUM_QUERIES, 8, 12)  # 1/4 of 32 x 48
        assert prediction["class_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)


def test_patch16_upsamples_twice():
    vit = build_vit(
        "vit_small_patch14_reg4_dinov2", (64, 32), 16, embed_dim=32, depth=2, num_heads=2
    )
    model = EoMT(vit, NUM_CLASSES, NUM_QUERIES, num_query_blocks=1).eval()
    assert len(model.upscale) == 2
    assert model(torch.rand(1, 3, 64, 32))[0]["mask_logits"].shape == (1, NUM_QUERIES, 16, 8)


@KINDS
def test_attention_mask_only_query_to_patch_follows_masks(kind):
    model = tiny_eomt(kind=kind)
    torch.manual_seed(0)
    logits = torch.randn(2, NUM_QUERIES, 8, 12)
    mask = model.attention_mask(logits, prob=1.0)[:, 0]
    first_patch = NUM_QUERIES + model.backbone.num_prefix_tokens
    grid = model.backbone.patch_embed.grid_size
    assert mask.shape == (2, first_patch + grid[0] * grid[1], first_patch + grid[0] * grid[1])
    # Everything but the query-to-patch block is open.
    assert mask[:, NUM_QUERIES:].all()
    assert mask[:, :NUM_QUERIES, :first_patch].all()
    # p = 1: the query-to-patch block is exactly "resized logit > 0".
    resized = torch.nn.functional.interpolate(logits, grid, mode="bilinear")
    assert torch.equal(mask[:, :NUM_QUERIES, first_patch:], (resized > 0).flatten(2))
    assert not mask[:, :NUM_QUERIES, first_patch:].all()


@KINDS
def test_attention_mask_probability(kind):
    model = tiny_eomt(kind=kind)
    logits = torch.full((1, NUM_QUERIES, 8, 12), -5.0)  # every query predicts an empty mask
    assert model.attention_mask(logits, prob=0.0).all()  # p = 0 never masks
    torch.manual_seed(0)
    first_patch = NUM_QUERIES + model.backbone.num_prefix_tokens
    kept = []
    for _ in range(400):
        block = model.attention_mask(logits, prob=0.3)[0, 0, :NUM_QUERIES, first_patch:]
        rows_masked = ~block.all(dim=1)
        # A query is either fully masked (kept its mask) or fully open (mask dropped).
        assert torch.equal(block.any(dim=1), ~rows_masked)
        kept.append(rows_masked.float().mean())
    assert abs(torch.stack(kept).mean().item() - 0.3) < 0.03


@KINDS
def test_unmasked_path_equals_all_open_mask(images, kind):
    model = tiny_eomt("always", kind=kind).eval()
    model.set_attn_mask_probs([0.0, 0.0])  # p = 0 everywhere: the masked path masks nothing
    with torch.no_grad():
        masked_path = model(images)[-1]
        model.masked_attn = "never"
        plain = model(images)[-1]
        # And an explicit all-open boolean mask gives the same as no mask.
        x = torch.randn(2, 10, 32)
        block = model.query_blocks[-1]
        open_mask = torch.ones(2, 1, 10, 10, dtype=torch.bool)
        torch.testing.assert_close(block(x, attn_mask=open_mask), block(x), rtol=1e-5, atol=1e-6)
    for key in ("mask_logits", "class_logits"):
        torch.testing.assert_close(masked_path[key], plain[key])


@KINDS
def test_masking_changes_the_result(images, kind):
    model = tiny_eomt("always", kind=kind).eval()
    with torch.no_grad():
        masked = model(images)[-1]["mask_logits"]
        model.set_attn_mask_probs([0.0, 0.0])
        open_ = model(images)[-1]["mask_logits"]
    assert not torch.allclose(masked, open_)


def test_rope_backbone_treats_queries_as_prefix(images):
    model = tiny_eomt(backbone="vit_small_patch16_dinov3").train()
    model.set_attn_mask_probs([0.5, 0.5])
    predictions = model(images)
    assert len(predictions) == 3
    prefix = model.backbone.num_prefix_tokens
    assert model.backbone.blocks[-1].attn.num_prefix_tokens == prefix + NUM_QUERIES
    assert model.backbone.blocks[0].attn.num_prefix_tokens == prefix
    predictions[-1]["mask_logits"].sum().backward()
    assert model.queries.weight.grad is not None


def test_build_model_from_config_and_bad_options():
    cfg = get_cfg(
        overrides=[
            "model.backbone=vit_small_patch14_reg4_dinov2",
            "model.pretrained=false",
            "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
            "input.image_size=[32, 32]",
            "model.num_queries=5",
            "model.num_classes=7",
            "model.num_query_blocks=2",
        ]
    )
    model = build_model(cfg)
    assert model.queries.weight.shape == (5, 32)
    assert model.class_head.out_features == 8
    assert len(model.query_blocks) == 2
    with pytest.raises(ValueError, match="masked_attn"):
        tiny_eomt("sometimes")
    with pytest.raises(ValueError, match="num_query_blocks"):
        tiny_eomt(blocks=4)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_vit("vit_small_patch14_reg4_dinov2", (32, 32), 8, weights="nope.safetensors")


def test_backbone_weights_from_a_local_file_are_resampled(tmp_path):
    # A "pretrained" DINOv2-style file at patch 14 and 28 x 28 pixels (a 2 x 2 grid) ...
    kwargs = dict(embed_dim=32, depth=2, num_heads=2)
    source = build_vit("vit_small_patch14_reg4_dinov2", (28, 28), 14, **kwargs)
    weights = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), weights)
    # ... loaded at patch 16 on a 4 x 4 grid: timm resamples the patch embedding and resizes the
    # position embedding; everything else is copied as is.
    vit = build_vit("vit_small_patch14_reg4_dinov2", (64, 64), 16, weights=str(weights), **kwargs)
    assert vit.patch_embed.proj.weight.shape == (32, 3, 16, 16)
    assert vit.pos_embed.shape[1] == 16
    torch.testing.assert_close(vit.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(vit.reg_token, source.reg_token)
    # A flat patch of colour gives the same embedding at both patch sizes (FlexiViT resampling
    # preserves the response to a constant input up to interpolation error).
    flat = torch.full((1, 3, 14, 14), 0.3)
    expected = torch.nn.functional.conv2d(flat, source.patch_embed.proj.weight)
    got = torch.nn.functional.conv2d(torch.full((1, 3, 16, 16), 0.3), vit.patch_embed.proj.weight)
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_eva02_final_norm_normalises_the_tokens():
    vit = build_vit(
        "eva02_large_patch14_224.mim_m38m", (32, 32), 16, embed_dim=32, depth=2, num_heads=2
    )
    assert isinstance(vit.norm, torch.nn.LayerNorm)
    assert isinstance(vit.fc_norm, torch.nn.Identity)
    model = EoMT(vit, NUM_CLASSES, NUM_QUERIES, num_query_blocks=1).train()
    outputs = model(torch.rand(1, 3, 32, 32))
    sum(p["mask_logits"].sum() + p["class_logits"].sum() for p in outputs).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("frozen, trainable_blocks", [(0, [0, 1, 2]), (2, [2]), (-1, [])])
def test_frozen_blocks_stop_training_and_leave_the_optimizer(frozen, trainable_blocks):
    model = tiny_eomt()
    freeze_blocks(model.backbone, frozen)
    blocks = [i for i, b in enumerate(model.backbone.blocks) if b.attn.qkv.weight.requires_grad]
    assert blocks == trainable_blocks
    assert model.backbone.patch_embed.proj.weight.requires_grad == (frozen == 0)
    assert model.backbone.norm.weight.requires_grad == (frozen != -1)
    optimizer = build_optimizer(model, 1e-3, 0.05, 0.8)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    trainable, frozen_count = count_trainable(model)
    assert trainable + frozen_count == sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    model.train()
    losses = model(torch.rand(2, 3, 32, 48))
    sum(p["mask_logits"].mean() for p in losses).backward()
    optimizer.step()
    for name, param in model.backbone.named_parameters():
        if not param.requires_grad:
            assert param.grad is None and torch.equal(param, before[name]), name
    with pytest.raises(ValueError, match="model.frozen_blocks=4: the backbone has 3 blocks"):
        freeze_blocks(model.backbone, 4)


@KINDS
def test_a_masked_training_forward_never_reads_a_value_back_from_the_device(
    images, kind, monkeypatch
):
    """No host synchronisation: `aten._local_scalar_dense` is what `.item()` and a Python `if`
    on a tensor run, and `.tolist()` reads the values (a CUDA device would wait there)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoReadBack(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "read back"
            return func(*args, **(kwargs or {}))

    model = tiny_eomt("anneal", kind=kind).train()
    model.set_attn_mask_probs([0.25, 1.0])
    torch.testing.assert_close(model.attn_mask_probs, torch.tensor([0.25, 1.0]))

    def no_tolist(tensor):
        raise AssertionError("tolist")

    with monkeypatch.context() as patch, NoReadBack():
        patch.setattr(torch.Tensor, "tolist", no_tolist)
        outputs = model(images)
    assert len(outputs) == 3
    with pytest.raises(ValueError, match="3 probabilities for 2 blocks"):
        model.set_attn_mask_probs([1.0, 1.0, 1.0])


@KINDS
def test_annealed_probabilities_compile_into_one_graph_without_a_break(images, kind):
    """A masked training forward under torch.compile(fullgraph=True): a graph break would
    raise, and new probabilities (values in a buffer) reuse the one graph."""
    torch._dynamo.reset()
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    model = tiny_eomt("anneal", kind=kind).train()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for probs in ([1.0, 1.0], [0.9, 1.0], [0.4, 0.8], [0.0, 0.1], [0.0, 0.0]):
        model.set_attn_mask_probs(probs)
        assert len(compiled(images)) == 3
    assert len(compiles) == 1
    torch._dynamo.reset()
