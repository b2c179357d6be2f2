import pytest
import torch

from eomt.modeling import build_vit, embed_tokens
from eomt.modeling.vit_adapter import ViTAdapter, default_interaction_indexes

HEIGHT, WIDTH, DIM = 64, 96, 32


def tiny_vit(backbone="vit_small_patch14_reg4_dinov2", depth=4, patch_size=16):
    return build_vit(
        backbone,
        img_size=(HEIGHT, WIDTH),
        patch_size=patch_size,
        embed_dim=DIM,
        depth=depth,
        num_heads=2,
    )


@pytest.fixture
def images():
    return torch.randn(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backbone", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"])
def test_outputs_at_strides_4_8_16_32(images, backbone):
    adapter = ViTAdapter(tiny_vit(backbone), deform_ratio=0.5)
    outputs = adapter(images)
    assert [tuple(f.shape) for f in outputs] == [
        (2, DIM, HEIGHT // s, WIDTH // s) for s in (4, 8, 16, 32)
    ]
    assert all(torch.isfinite(f).all() for f in outputs)


def test_zero_gamma_leaves_the_vit_tokens_unchanged(images):
    torch.manual_seed(0)
    adapter = ViTAdapter(tiny_vit()).eval()
    vit = adapter.vit
    with torch.no_grad():
        x, _ = embed_tokens(vit, images)
        for block in vit.blocks:
            x = block(x)
        plain = x[:, vit.num_prefix_tokens :]  # the 4 registers and the class token stay prefix
        tokens, _, _ = adapter.interact(images)
        assert torch.equal(tokens, plain)
        adapter.interactions[1].injector.gamma.fill_(0.1)
        tokens, _, _ = adapter.interact(images)
        assert not torch.allclose(tokens, plain)


def test_interaction_indexes_from_depth():
    assert default_interaction_indexes(12) == [[0, 2], [3, 5], [6, 8], [9, 11]]
    assert default_interaction_indexes(24) == [[0, 5], [6, 11], [12, 17], [18, 23]]
    assert default_interaction_indexes(40) == [[0, 9], [10, 19], [20, 29], [30, 39]]
    with pytest.raises(ValueError, match="depth 10 does not split"):
        default_interaction_indexes(10)
    adapter = ViTAdapter(tiny_vit(depth=8))
    assert adapter.interaction_indexes == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [len(i.extra_extractors) for i in adapter.interactions] == [0, 0, 0, 2]
    assert [
        len(i.extra_extractors)
        for i in ViTAdapter(tiny_vit(), use_extra_extractor=False).interactions
    ] == [0] * 4


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="must cover blocks 0..3"):
        ViTAdapter(tiny_vit(), interaction_indexes=[[0, 1], [3, 3]])
    with pytest.raises(ValueError, match="must end at block 3"):
        ViTAdapter(tiny_vit(), interaction_indexes=[[0, 1], [2, 2]])
    with pytest.raises(ValueError, match="needs 16x16 patches"):
        ViTAdapter(tiny_vit(patch_size=8))
    adapter = ViTAdapter(tiny_vit())
    with pytest.raises(ValueError, match="divisible by 32, got 48x96"):
        adapter(torch.zeros(1, 3, 48, 96))


def test_gradients_reach_the_spatial_prior_module(images):
    adapter = ViTAdapter(tiny_vit()).train()
    sum(f.square().mean() for f in adapter(images)).backward()
    for name, param in adapter.spm.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The injector's attention is switched off by gamma = 0, but gamma itself learns.
    assert adapter.interactions[0].injector.gamma.grad.abs().sum() > 0
    assert adapter.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def msdeform_attn_params(dim, levels, heads, points, ratio):
    value_dim = int(dim * ratio)
    offsets = (dim + 1) * heads * levels * points * 2
    weights = (dim + 1) * heads * levels * points
    return offsets + weights + (dim + 1) * value_dim + (value_dim + 1) * dim


def test_vit_adapter_large_parameter_count():
    dim, heads, points, ratio, inplane = 1024, 16, 4, 0.5, 64
    hidden = dim // 4
    with torch.device("meta"):
        vit = build_vit("vit_large_patch14_reg4_dinov2", img_size=(640, 640), patch_size=16)
        vit_params = sum(p.numel() for p in vit.parameters())
        adapter = ViTAdapter(vit, deform_ratio=ratio)
    assert adapter.interaction_indexes == [[0, 5], [6, 11], [12, 17], [18, 23]]
    added = sum(p.numel() for p in adapter.parameters()) - vit_params

    convs = 9 * (3 * inplane + 2 * inplane * inplane + inplane * 2 * inplane)
    convs += 9 * (2 * inplane * 4 * inplane + 4 * inplane * 4 * inplane)
    batch_norms = 2 * (3 * inplane + 2 * inplane + 4 * inplane + 4 * inplane)
    projections = (inplane + 2 * inplane + 4 * inplane + 4 * inplane) * dim + 4 * dim
    spm = convs + batch_norms + projections
    injector = 2 * 2 * dim + msdeform_attn_params(dim, 3, heads, points, ratio) + dim
    conv_ffn = (dim + 1) * hidden + 10 * hidden + (hidden + 1) * dim
    extractor = (
        2 * 2 * dim + msdeform_attn_params(dim, 1, heads, points, ratio) + conv_ffn + 2 * dim
    )
    level_embed, up, output_norms = 3 * dim, 4 * dim * dim + dim, 4 * 2 * dim
    final_vit_norm = -2 * dim  # unused by the adapter, replaced by an identity
    expected = level_embed + spm + 4 * injector + 6 * extractor + up + output_norms
    assert added == expected + final_vit_norm
    assert 23.0e6 < added < 23.5e6
