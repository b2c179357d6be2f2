"""ALGM token merging (eomt/modeling/token_merging.py) on tiny models: the merges by hand, the
exact no-merge path, proportional attention, batching, masked attention, gradients, refusals."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from eomt.config import get_cfg
from eomt.deploy.runtime import FastForward
from eomt.modeling import EoMT, TokenMerging, build_model, build_vit
from eomt.modeling.token_merging import (
    MergeState,
    attention_bias,
    global_merge,
    local_merge,
    merge_tokens,
    unmerge,
    window_similarity,
)

NUM_QUERIES, NUM_CLASSES = 6, 4
SIZE = (32, 48)  # patch 8: a 4 x 6 grid


def tiny_vit(backbone="vit_small_patch14_reg4_dinov2", depth=4):
    torch.manual_seed(0)
    return build_vit(backbone, img_size=SIZE, patch_size=8, embed_dim=32, depth=depth, num_heads=2)


def tiny_eomt(merging=None, masked_attn="anneal", vit=None):
    torch.manual_seed(0)
    vit = tiny_vit() if vit is None else vit
    return EoMT(vit, NUM_CLASSES, NUM_QUERIES, 2, masked_attn, token_merging=merging)


def pair(merging, masked_attn="anneal"):
    """The same weights without and with `merging`."""
    plain = tiny_eomt(None, masked_attn)
    merged = tiny_eomt(merging, masked_attn)
    merged.load_state_dict(plain.state_dict())
    return plain, merged


def scene(seed=0):
    """Two flat halves (merge) beside a noisy strip (does not), at SIZE."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.empty(3, *SIZE)
    image[:, :, :16] = torch.tensor([0.2, 0.3, 0.8])[:, None, None]
    image[:, :, 16:32] = torch.tensor([0.4, 0.4, 0.4])[:, None, None]
    image[:, :, 32:] = torch.rand(3, SIZE[0], 16, generator=generator)
    return image


def noise(seed=1):
    return torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(seed))


def test_local_merge_by_hand():
    # A 2 x 4 grid, two 2 x 2 windows: the left one holds one vector four times, the right
    # one four orthogonal vectors.
    u = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0])
    right = torch.eye(5)[1:]
    grid = torch.empty(2, 4, 5)
    grid[:, :2] = u
    grid[0, 2], grid[0, 3], grid[1, 2], grid[1, 3] = right
    patches = grid.reshape(1, 8, 5)
    similarity = window_similarity(patches, (2, 4), 2)
    assert torch.allclose(similarity, torch.tensor([[[1.0, 0.0]]]))
    merged, state = local_merge(patches, (2, 4), window=2, threshold=0.88)
    # Raster order of the kept places: the left window at its first patch (0), then 2, 3, 6, 7.
    assert state.assign.tolist() == [[0, 0, 1, 2, 0, 0, 3, 4]]
    assert state.sizes.tolist() == [[4.0, 1.0, 1.0, 1.0, 1.0]]
    assert torch.equal(merged[0, 0], u)
    assert torch.equal(merged[0, 1:], patches[0, [2, 3, 6, 7]])
    # Two identical windows: both merge, each into its own token.
    grid[:, 2:] = 3 * u
    merged, state = local_merge(grid.reshape(1, 8, 5), (2, 4), window=2, threshold=0.88)
    assert state.assign.tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]
    assert torch.allclose(merged[0], torch.stack([u, 3 * u]))


def test_window_similarity_is_the_mean_pairwise_cosine_similarity():
    patches = torch.randn(2, 4 * 6, 8, generator=torch.Generator().manual_seed(0))
    similarity = window_similarity(patches, (4, 6), 2)
    grid = patches.reshape(2, 4, 6, 8)
    for b, i, j in itertools.product(range(2), range(2), range(3)):
        tokens = grid[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(4, 8)
        cosines = F.cosine_similarity(tokens[:, None], tokens[None], dim=-1)
        expected = (cosines.sum() - cosines.diagonal().sum()) / 12
        assert similarity[b, i, j] == pytest.approx(float(expected), abs=1e-6)


def test_a_grid_not_divisible_by_the_window_keeps_its_last_row_and_column():
    patches = torch.ones(1, 3 * 5, 4)  # all equal: every whole window merges
    _, state = local_merge(patches, (3, 5), window=2, threshold=0.5)
    # 2 windows (rows 0-1, columns 0-3), the last column beside them (2), the last row (5)
    assert state.counts.tolist() == [2 + 2 + 5]
    assert state.sizes.sum() == 15


def test_global_merge_pairs_similar_tokens_by_the_adaptive_threshold():
    # A (even slots) 0, 2, 4, 6; B (odd) 1, 3, 5, 7. A 0 copies B 3, A 4 nearly copies B 5.
    tokens = torch.eye(8)[None].clone()
    tokens[0, 0] = tokens[0, 3]
    tokens[0, 4] = tokens[0, 5] + 0.01 * tokens[0, 4]
    state = MergeState.identity(1, 8, "cpu")
    merged, new = global_merge(tokens, state, layer=5)
    assert new.counts.tolist() == [6]
    assert new.assign[0, 0] == new.assign[0, 3] and new.assign[0, 4] == new.assign[0, 5]
    assert new.sizes.sum() == 8
    assert torch.allclose(unmerge(merged, new)[0, 4], (tokens[0, 4] + tokens[0, 5]) / 2)


def test_nothing_merges_gives_back_the_exact_tokens():
    patches = torch.randn(2, 24, 8)
    merged, state = local_merge(patches, (4, 6), window=2, threshold=1.5)
    assert torch.equal(unmerge(merged, state), patches)
    assert torch.equal(state.sizes, torch.ones(2, 24))


@pytest.mark.parametrize("restore", ["mask_head", "query_blocks"])
@pytest.mark.parametrize(
    "masked_attn, training", [("anneal", False), ("anneal", True), ("always", False)]
)
def test_without_merges_the_outputs_equal_the_plain_model(restore, masked_attn, training):
    merging = TokenMerging(threshold=1.5, global_block=-1, restore=restore)
    plain, merged = pair(merging, masked_attn)
    plain.train(training), merged.train(training)
    if training:
        plain.set_attn_mask_probs([0.5, 0.5]), merged.set_attn_mask_probs([0.5, 0.5])
    images = torch.stack([scene(), noise()])
    torch.manual_seed(1)
    expected = plain(images)
    torch.manual_seed(1)
    got = merged(images)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


def test_proportional_attention_equals_attention_over_the_duplicated_tokens():
    attn = tiny_vit().blocks[0].attn.eval()
    tokens = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[3.0, 1.0, 2.0, 1.0, 4.0]])
    state = MergeState(torch.zeros(1, 1, dtype=torch.long), sizes)  # assign unused here
    bias = attention_bias(state, 0, prop_attn=True)
    with torch.no_grad():
        merged = attn(tokens, attn_mask=bias)
        copies = sizes[0].long()
        duplicated = attn(tokens.repeat_interleave(copies, dim=1))
    torch.testing.assert_close(merged.repeat_interleave(copies, dim=1), duplicated)


def test_padding_slots_are_hidden_from_attention():
    attn = tiny_vit().blocks[0].attn.eval()
    tokens = torch.randn(1, 4, 32)
    padded = torch.cat((tokens, 100 * torch.randn(1, 3, 32)), 1)
    for prop_attn in (True, False):
        sizes = torch.tensor([[2.0, 1.0, 1.0, 3.0]])
        bias = attention_bias(MergeState(None, sizes), 0, prop_attn)
        padded_bias = attention_bias(MergeState(None, F.pad(sizes, (0, 3))), 0, prop_attn)
        with torch.no_grad():
            expected = attn(tokens, attn_mask=bias)
            got = attn(padded, attn_mask=padded_bias)[:, :4]
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("restore", ["mask_head", "query_blocks"])
@pytest.mark.parametrize("masked_attn", ["never", "always"])
def test_batched_merging_equals_per_image_merging(restore, masked_attn):
    merging = TokenMerging(threshold=0.9, global_block=1, restore=restore)
    model = tiny_eomt(merging, masked_attn).eval()
    images = [scene(), noise(), scene(seed=3)]
    singles, counts = [], []
    for image in images:
        singles.append(model(image[None]))
        counts.append(int(model.token_merging.last_state.counts[0]))
    batched = model(torch.stack(images))
    assert model.token_merging.last_state.counts.tolist() == counts
    assert len(set(counts)) > 1, "the test needs images that merge differently"
    assert counts[0] < 24  # the scene merges
    for depth, prediction in enumerate(batched):
        for index in range(len(images)):
            for key, value in prediction.items():
                torch.testing.assert_close(
                    value[index], singles[index][depth][key][0], rtol=1e-4, atol=1e-4
                )


def test_min_batch_count_shares_one_count_without_padding():
    merging = TokenMerging(threshold=0.9, global_block=1, batch_count="min")
    model = tiny_eomt(merging).eval()
    model(torch.stack([scene(), noise()]))
    state = model.token_merging.last_state
    counts = state.counts.tolist()
    assert counts[0] == counts[1] == state.sizes.shape[1]
    assert (state.sizes > 0).all()


def test_merge_tokens_weights_by_size():
    x = torch.tensor([[[1.0], [4.0], [10.0]]])
    sizes = torch.tensor([[1.0, 2.0, 0.0]])  # the last: padding, dropped by mapping to 1
    merged, new_sizes = merge_tokens(x, sizes, torch.tensor([[0, 0, 1]]), 1)
    assert merged.tolist() == [[[3.0]]] and new_sizes.tolist() == [[3.0]]


@pytest.mark.parametrize("training", [False, True])
def test_masked_attention_always_with_merges(training):
    merging = TokenMerging(threshold=0.9, global_block=1)
    model = tiny_eomt(merging, "always").train(training)
    images = torch.stack([scene(), noise()])
    predictions = model(images)
    assert len(predictions) == 3  # one before each query block, then the final one
    for prediction in predictions:
        assert prediction["mask_logits"].shape == (2, NUM_QUERIES, 8, 12)  # 1/4, as unmerged
    state = model.token_merging.last_state
    assert state.counts.min() < 24
    # The mask pooled to merged tokens: a token is open to a query when its patches' mean
    # resized logit is positive.
    logits = torch.randn(2, NUM_QUERIES, 8, 12)
    bias = attention_bias(state, NUM_QUERIES + model.backbone.num_prefix_tokens, True)
    mask = model.token_merging.masked_bias(model, logits, 1.0, state, bias)
    leading = NUM_QUERIES + model.backbone.num_prefix_tokens
    grid_logits = F.interpolate(logits, (4, 6), mode="bilinear").flatten(2)
    for b in range(2):
        for token in range(int(state.counts[b])):
            patches = state.assign[b] == token
            open_ = bool(grid_logits[b][:, patches].mean(1)[0] > 0)
            assert bool(torch.isfinite(mask[b, 0, 0, leading + token])) == open_


def test_gradients_flow_through_merging():
    merging = TokenMerging(threshold=0.9, global_block=1)
    model = tiny_eomt(merging).train()
    model.set_attn_mask_probs([0.5, 0.5])
    predictions = model(torch.stack([scene(), noise()]))
    assert model.token_merging.last_state.counts.min() < 24
    sum(p["mask_logits"].sum() + p["class_logits"].sum() for p in predictions).backward()
    for name, param in model.named_parameters():
        if name.startswith(("backbone.cls_token", "backbone.reg_token")):
            continue  # the prefix reaches the masks only through attention
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def _cfg(*overrides):
    return get_cfg(
        overrides=[
            "model.backbone=vit_small_patch14_reg4_dinov2",
            "model.pretrained=false",
            "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
            "input.image_size=[32, 48]",
            "model.patch_size=8",
            "model.num_queries=5",
            "model.num_classes=7",
            "model.num_query_blocks=2",
            *overrides,
        ]
    )


def test_config_switch():
    assert build_model(_cfg()).token_merging is None
    model = build_model(
        _cfg("model.token_merging.enabled=true", "model.token_merging.global_block=1")
    )
    merging = model.token_merging
    assert (merging.window, merging.threshold, merging.local_block) == (2, 0.88, 0)
    assert merging.global_block == 1 and merging.prop_attn and merging.restore == "mask_head"
    assert model.eval()(torch.rand(1, 3, *SIZE))[-1]["mask_logits"].shape == (1, 5, 8, 12)
    # A checkpoint of the plain model loads into the merging one: no new parameters.
    model.load_state_dict(build_model(_cfg()).state_dict())


def test_refusals():
    on = "model.token_merging.enabled=true"
    with pytest.raises(ValueError, match="solver.compile"):
        build_model(_cfg(on, "model.token_merging.global_block=1", "solver.compile=true"))
    with pytest.raises(ValueError, match="query blocks"):
        build_model(_cfg(on))  # global block 4 of a 4-block ViT with 2 query blocks
    with pytest.raises(ValueError, match="model.name 'eomt' only"):
        build_model(_cfg(on, "model.name=pmt"))
    with pytest.raises(ValueError, match="after local"):
        TokenMerging(local_block=2, global_block=1)
    with pytest.raises(ValueError, match="rotary"):
        tiny_eomt(TokenMerging(global_block=1), vit=tiny_vit("vit_small_patch16_dinov3"))
    model = tiny_eomt(TokenMerging(global_block=1))
    with pytest.raises(ValueError, match="torch.compile"):
        FastForward(model, compile_mode="default")
    FastForward(model)  # eager is fine


def test_onnx_export_is_refused(tmp_path):
    pytest.importorskip("onnx")
    from eomt.deploy.onnx_export import export

    model = tiny_eomt(TokenMerging(global_block=1))
    with pytest.raises(ValueError, match="ONNX"):
        export(model, tmp_path / "model.onnx", SIZE)
    assert not (tmp_path / "model.onnx").exists()


def test_benchmark_side_by_side_and_picture(tmp_path):
    from PIL import Image

    from eomt.merging_benchmark import (
        compare,
        image_windows,
        merge_picture,
        model_pair,
        street_scene,
    )

    street = street_scene(64, 128, seed=0)
    assert street.shape == (3, 64, 128) and 0 <= street.min() and street.max() <= 1
    semantic = _cfg("task=semantic", "input.image_size=[32, 32]", "test.metrics=[semantic]")
    # The short side resized to the window: 32 x 64, two windows.
    assert image_windows(street, semantic).shape == (2, 3, 32, 32)
    cfg = _cfg("model.token_merging.global_block=1")
    plain, merged = model_pair(cfg)
    assert plain.token_merging is None and merged.token_merging is not None
    result = compare(plain, merged, cfg, [scene(), noise()], rounds=1, warmup=0)
    assert result["timed_forwards_each"] == 2 and result["windows_per_image"] == 1
    assert result["gflops_ratio"] > 1
    assert result["patch_tokens_per_window"] == 24 and len(result["tokens_after_merges"]) == 2
    path = merge_picture(merged, scene(), cfg, tmp_path / "merged.png", scale=1.0)
    assert Image.open(path).size == (48, 64)  # the window above its mosaic
