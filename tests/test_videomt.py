import pytest
import torch

from eomt.config import get_cfg
from eomt.modeling import EoMT, VidEoMT, build_model, build_vit

NUM_QUERIES, NUM_CLASSES = 6, 4


def tiny_videomt(norm_queries=False, seed=0):
    torch.manual_seed(seed)
    vit = build_vit(
        "vit_small_patch14_reg4_dinov2",
        img_size=(32, 48),
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
    )
    return VidEoMT(vit, NUM_CLASSES, NUM_QUERIES, num_query_blocks=2, norm_queries=norm_queries)


@pytest.fixture
def clips():
    return torch.rand(2, 4, 3, 32, 48, generator=torch.Generator().manual_seed(0))


def as_eomt(model: VidEoMT) -> EoMT:
    """The image model with the same weights: VidEoMT's first frame is EoMT on that frame."""
    eomt = EoMT(model.backbone, NUM_CLASSES, NUM_QUERIES, 2, masked_attn="never")
    eomt.load_state_dict(model.state_dict(), strict=False)
    return eomt.eval()


@pytest.mark.parametrize("norm_queries", [False, True])
def test_propagation_by_hand(clips, norm_queries):
    """Frame 0 is EoMT on frame 0 with the learned queries; frame t is EoMT whose queries
    are updater(frame t-1's output queries) + the learned queries."""
    model = tiny_videomt(norm_queries).eval()
    with torch.no_grad():
        out = model(clips)
        eomt = as_eomt(model)
        first = eomt(clips[:, 0])[-1]
        assert torch.allclose(out[0]["mask_logits"], first["mask_logits"], atol=1e-5)

        queries = model.queries.weight.expand(2, -1, -1)
        for t in range(4):
            x, kwargs = model.encode(clips[:, t])
            x = torch.cat((queries, x), 1)
            for block in model.backbone.blocks[1:]:
                x = block(x)
            normed = model.backbone.norm(x)
            expected = model.predict(normed)
            for key in ("mask_logits", "class_logits"):
                assert torch.allclose(out[t][key], expected[key], atol=1e-5)
            source = normed if norm_queries else x
            queries = source[:, :NUM_QUERIES] @ model.query_updater.weight.T
            queries = queries + model.query_updater.bias + model.queries.weight
        # The propagation matters: frame 1 differs from EoMT on frame 1.
        image = eomt(clips[:, 1])[-1]["class_logits"]
        assert not torch.allclose(out[1]["class_logits"], image, atol=1e-3)


def test_inference_shapes_and_online(clips):
    model = tiny_videomt().eval()
    with torch.no_grad():
        out = model(clips)
        assert len(out) == 4
        for prediction in out:
            assert prediction["mask_logits"].shape == (2, NUM_QUERIES, 8, 12)
            assert prediction["class_logits"].shape == (2, NUM_QUERIES, NUM_CLASSES + 1)
        # Online: frames after t do not change frame t.
        changed = clips.clone()
        changed[:, 2:] = torch.rand_like(changed[:, 2:])
        again = model(changed)
    for t in range(2):
        assert torch.equal(out[t]["mask_logits"], again[t]["mask_logits"])
    assert not torch.allclose(out[2]["mask_logits"], again[2]["mask_logits"])


def test_streaming_equals_clip(clips):
    model = tiny_videomt().eval()
    with torch.no_grad():
        clip = model(clips)
        queries = None
        for t in range(4):
            prediction, queries = model.step(clips[:, t], queries)
            assert queries.shape == (2, NUM_QUERIES, 32)
            for key in ("mask_logits", "class_logits"):
                assert torch.allclose(prediction[key], clip[t][key], atol=1e-5)


def test_batched_clips_equal_one_by_one(clips):
    model = tiny_videomt().eval()
    with torch.no_grad():
        both = model(clips)
        second = model(clips[1:])
    for t in range(4):
        assert torch.allclose(both[t]["mask_logits"][1:], second[t]["mask_logits"], atol=1e-5)


def test_training_outputs_per_depth_and_gradients(clips):
    model = tiny_videomt().train()
    out = model(clips)
    assert len(out) == 3  # before each of the 2 query blocks, then the final one
    for prediction in out:
        assert prediction["mask_logits"].shape == (2, 4, NUM_QUERIES, 8, 12)
        assert prediction["class_logits"].shape == (2, 4, NUM_QUERIES, NUM_CLASSES + 1)
    sum(p["mask_logits"].mean() + p["class_logits"].mean() for p in out).backward()
    assert model.query_updater.weight.grad.abs().sum() > 0
    assert model.queries.weight.grad.abs().sum() > 0
    # The final training prediction equals the inference one (no dropout in the tiny ViT).
    final = out[-1]
    with torch.no_grad():
        inference = model.eval()(clips)
    last_frame = final["mask_logits"][:, 3].detach()
    assert torch.allclose(last_frame, inference[3]["mask_logits"], atol=1e-5)


def test_build_from_config():
    cfg = get_cfg()
    cfg.model.name = "videomt"
    cfg.model.backbone = "vit_small_patch14_reg4_dinov2"
    cfg.model.backbone_kwargs = {"embed_dim": 32, "depth": 3, "num_heads": 2}
    cfg.model.pretrained = False
    cfg.model.num_classes = NUM_CLASSES
    cfg.model.num_queries = NUM_QUERIES
    cfg.model.num_query_blocks = 2
    cfg.input.image_size = [32, 48]
    cfg.model.patch_size = 8
    with pytest.raises(ValueError, match="masked_attn never"):
        build_model(cfg)
    cfg.model.masked_attn = "never"
    cfg.videomt.norm_queries = True
    model = build_model(cfg)
    assert isinstance(model, VidEoMT) and model.norm_queries
