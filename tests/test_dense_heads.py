import math

import pytest
import torch
import torch.nn.functional as F

from eomt.modeling import build_vit, default_taps
from eomt.modeling.dense_heads import (
    DENSE_HEADS,
    DenseSegmenter,
    PixelCrossEntropy,
    label_map,
)

NUM_CLASSES = 4
DINOV2, DINOV3 = "vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"
# Every head, and unet with its convolutional stem.
VARIANTS = [(head, False) for head in DENSE_HEADS] + [("unet", True)]
# Widths and depths standing in for ViT-S, B and L (their taps are those of 12 and 24 blocks).
SIZES = [(32, 3), (48, 12), (64, 24)]


def tiny_vit(patch=8, img_size=(32, 48), dim=32, depth=3, backbone=DINOV2):
    return build_vit(
        backbone, img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=2
    )


def random_targets(batch, size, num_classes=NUM_CLASSES, seed=0):
    """One mask per class present, as the semantic dataset gives them, and ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        labels_map = torch.randint(0, num_classes + 1, size, generator=g)  # num_classes: ignored
        classes = labels_map[labels_map < num_classes].unique()
        targets.append({"masks": labels_map[None] == classes[:, None, None], "labels": classes})
    return targets


def test_default_taps():
    assert default_taps(24) == [5, 11, 17, 23]
    assert default_taps(12) == [2, 5, 8, 11]
    assert default_taps(40) == [9, 19, 29, 39]
    assert default_taps(3) == [0, 1, 2] and default_taps(1) == [0]
    for depth in range(1, 50):
        taps = default_taps(depth)
        assert taps == sorted(set(taps)) and taps[0] >= 0 and taps[-1] == depth - 1
        assert len(taps) == min(depth, 4)


@pytest.mark.parametrize("head, stem", VARIANTS)
@pytest.mark.parametrize("patch, img_size", [(8, (32, 48)), (16, (64, 32))])
@pytest.mark.parametrize("dim, depth", SIZES)
def test_output_shapes(head, stem, patch, img_size, dim, depth):
    model = DenseSegmenter(tiny_vit(patch, img_size, dim, depth), NUM_CLASSES, head, stem=stem)
    assert model.taps == ([depth - 1] if head == "linear" else default_taps(depth))
    predictions = model.eval()(torch.rand(2, 3, *img_size))
    assert isinstance(predictions, list) and len(predictions) == 1
    logits = predictions[0]["semantic_logits"]
    assert logits.shape == (2, NUM_CLASSES, img_size[0] // 4, img_size[1] // 4)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("head, stem", VARIANTS)
@pytest.mark.parametrize("patch", [4, 32])
def test_output_shapes_other_patch_sizes(head, stem, patch):
    model = DenseSegmenter(tiny_vit(patch, (64, 96), depth=4), NUM_CLASSES, head, stem=stem)
    logits = model.eval()(torch.rand(1, 3, 64, 96))[0]["semantic_logits"]
    assert logits.shape == (1, NUM_CLASSES, 16, 24)


@pytest.mark.parametrize("head", DENSE_HEADS)
def test_rotary_backbone(head):
    """DINOv3's blocks take the rotary embedding; the heads see the same grids."""
    model = DenseSegmenter(tiny_vit(16, (32, 48), depth=4, backbone=DINOV3), NUM_CLASSES, head)
    logits = model.eval()(torch.rand(2, 3, 32, 48))[0]["semantic_logits"]
    assert logits.shape == (2, NUM_CLASSES, 8, 12) and torch.isfinite(logits).all()


def test_default_channels():
    vit = tiny_vit(16, (32, 48), dim=384, depth=4)
    assert DenseSegmenter(vit, 3, "mlp").channels == 256
    assert DenseSegmenter(vit, 3, "dpt").channels == 256
    assert DenseSegmenter(vit, 3, "unet").channels == [256, 128, 64]
    assert DenseSegmenter(tiny_vit(8), 3, "unet").channels == [32, 16]  # scaled to D = 32
    assert DenseSegmenter(vit, 3, "unet", channels=[64, 32, 16]).channels == [64, 32, 16]
    assert DenseSegmenter(vit, 3, "mlp", channels=128).head.classifier.in_channels == 128


def test_head_reads_the_tapped_blocks_tokens():
    """The grids are the patch tokens of the tapped blocks, each through the final norm (as
    PMT reads them), and no block after the last tap runs or trains."""
    model = DenseSegmenter(tiny_vit(8, depth=4), NUM_CLASSES, "mlp", taps=[0, 1, 2]).eval()
    seen = []
    model.head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.rand(2, 3, 32, 48)
    model(images)

    vit = model.backbone
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed((images - model.pixel_mean) / model.pixel_std)))
    expected = []
    for i in range(3):
        x = vit.blocks[i](x)
        tokens = vit.norm(x)
        expected.append(tokens[:, vit.num_prefix_tokens :].transpose(1, 2).reshape(2, 32, 4, 6))
    assert len(seen[0]) == 3
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want)

    model.train()
    PixelCrossEntropy(NUM_CLASSES)(model(images), random_targets(2, (32, 48)))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in vit.blocks[3].parameters())
    assert all(p.grad is not None for p in vit.blocks[0].parameters())


def test_linear_head_is_a_per_token_classifier():
    model = DenseSegmenter(tiny_vit(8), NUM_CLASSES, "linear").eval()
    images = torch.rand(1, 3, 32, 48)
    seen = []
    model.head.register_forward_pre_hook(lambda module, args: seen.append(args[0][0]))
    logits = model(images)[0]["semantic_logits"]
    conv = model.head.classifier
    per_token = torch.einsum("bdhw,cd->bchw", seen[0], conv.weight[:, :, 0, 0])
    per_token = per_token + conv.bias[:, None, None]
    torch.testing.assert_close(logits, F.interpolate(per_token, (8, 12), mode="bilinear"))


@pytest.mark.parametrize("head, stem", VARIANTS)
@pytest.mark.parametrize("frozen", [False, True])
def test_one_training_step(head, stem, frozen):
    torch.manual_seed(0)
    model = DenseSegmenter(tiny_vit(8, depth=4), NUM_CLASSES, head, stem=stem).train()
    backbone = list(model.backbone.parameters())
    if frozen:
        for p in backbone:
            p.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Every tap must reach the logits: each grid the head gets has a non-zero gradient.
    grids = []

    def keep(module, args):
        for grid in args[0]:
            grid.requires_grad_(True).retain_grad()
            grids.append(grid)

    model.head.register_forward_pre_hook(keep)
    # The optimizer has every parameter: AdamW skips those with no gradient.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    losses = PixelCrossEntropy(NUM_CLASSES)(
        model(torch.rand(2, 3, 32, 48)), random_targets(2, (32, 48)), num_masks=5.0
    )
    assert set(losses) == {"loss_ce", "loss"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert len(grids) == len(model.taps)
    assert all(grid.grad.abs().sum() > 0 for grid in grids)
    for name, p in model.head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    if frozen:
        assert all(p.grad is None for p in backbone)
    else:
        assert all(p.grad is not None for p in model.backbone.blocks.parameters())
    optimizer.step()
    for name, p in model.named_parameters():
        if name.startswith("backbone.") and frozen:
            assert torch.equal(p, before[name]), name  # bit for bit
        elif name.startswith("head."):
            assert not torch.equal(p, before[name]), name


def test_label_map_from_masks():
    masks = torch.zeros(2, 3, 4, dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[1, 1:, 1:] = True
    target = {"masks": masks, "labels": torch.tensor([3, 1])}
    empty = {"masks": torch.zeros(0, 3, 4, dtype=torch.bool), "labels": torch.zeros(0).long()}
    expected = torch.tensor([[3, 3, 255, 255], [255, 1, 1, 1], [255, 1, 1, 1]])
    got = label_map([target, empty])
    assert got.dtype == torch.long
    assert torch.equal(got, torch.stack([expected, torch.full((3, 4), 255)]))
    assert torch.equal(label_map([empty], ignore_index=-1), torch.full((1, 3, 4), -1))


def test_pixel_cross_entropy_by_hand():
    # 3 classes, a 2 x 2 image, one pixel ignored (in no mask).
    logits = torch.tensor(
        [[[1.0, 0.0], [2.0, -1.0]], [[0.0, 3.0], [0.5, 0.0]], [[-1.0, 1.0], [0.0, 0.0]]]
    )
    masks = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 0]]], dtype=torch.bool)
    target = {"masks": masks, "labels": torch.tensor([0, 2])}
    # pixel (0, 0): class 0; (0, 1) and (1, 0): class 2; (1, 1) ignored.
    by_hand = []
    for (y, x), c in [((0, 0), 0), ((0, 1), 2), ((1, 0), 2)]:
        z = [float(logits[k, y, x]) for k in range(3)]
        by_hand.append(-z[c] + math.log(sum(math.exp(v) for v in z)))
    losses = PixelCrossEntropy(3)([{"semantic_logits": logits[None]}], [target])
    assert losses["loss"].item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    assert losses["loss_ce"] is losses["loss"]


def test_pixel_cross_entropy_upsamples_the_final_prediction():
    # Constant logits at 1/4 stay constant when upsampled to the 8 x 8 targets.
    logits = torch.tensor([2.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :3] = True
    masks[1, 5:] = True
    target = {"masks": masks, "labels": torch.tensor([1, 2])}
    lse = math.log(math.exp(2) + 1 + math.exp(1))
    expected = (24 * (lse - 0.0) + 24 * (lse - 1.0)) / 48
    stale = {"semantic_logits": torch.zeros(1, 3, 2, 2)}  # an earlier prediction: not used
    loss = PixelCrossEntropy(3)([stale, {"semantic_logits": logits}], [target])["loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pixel_cross_entropy_all_ignored_is_zero_with_a_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    empty = {"masks": torch.zeros(0, 8, 8, dtype=torch.bool), "labels": torch.zeros(0).long()}
    loss = PixelCrossEntropy(3)([{"semantic_logits": logits}], [empty])["loss"]
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_tiny_overfit():
    """The mlp head on a tiny ViT from scratch learns 2 fixed images of 3 classes (a disc, a
    half plane at a place no patch boundary follows, the background)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(48), indexing="ij")
    labels = torch.zeros(2, 32, 48, dtype=torch.long)
    labels[0, :, 27:] = 2
    labels[1, :, :21] = 2
    labels[0][(yy - 13) ** 2 + (xx - 12) ** 2 <= 81] = 1
    labels[1][(yy - 17) ** 2 + (xx - 35) ** 2 <= 81] = 1
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
    noise = 0.05 * torch.randn(2, 3, 32, 48, generator=g)
    images = (colours[labels].permute(0, 3, 1, 2) + noise).clamp(0, 1)
    targets = [
        {"masks": labels[i][None] == torch.arange(3)[:, None, None], "labels": torch.arange(3)}
        for i in range(2)
    ]
    model = DenseSegmenter(tiny_vit(8), 3, "mlp")
    criterion = PixelCrossEntropy(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def accuracy():
        with torch.no_grad():
            logits = model.eval()(images)[0]["semantic_logits"]
        model.train()
        predicted = F.interpolate(logits, (32, 48), mode="bilinear").argmax(1)
        return (predicted == labels).float().mean().item()

    assert accuracy() < 0.6  # the largest class covers 44%
    for _ in range(150):
        loss = criterion(model(images), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy() > 0.95


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(head="segformer"), "head must be one of \\['linear', 'mlp', 'unet', 'dpt'\\]"),
        (
            dict(head="mlp", taps=[0, 4]),
            "taps \\[0, 4\\] must be a non-empty list of blocks in 0..3",
        ),
        (dict(head="mlp", taps=[-1, 3]), "in 0..3"),
        (dict(head="mlp", taps=[]), "non-empty"),
        (dict(head="unet", taps=[2, 1, 3]), "strictly increasing"),
        (dict(head="dpt", taps=[0, 0, 1, 3]), "strictly increasing"),
        (dict(head="mlp", taps=[0, 1, 2, 3, 3]), "strictly increasing"),
        (dict(head="linear", stem=True), "stem=True is an option of head 'unet' only"),
        (dict(head="linear", channels=64), "head 'linear' has no channels"),
        (dict(head="unet", channels=[64, 32, 16]), "has 2 stages .* got \\[64, 32, 16\\]"),
        (dict(head="mlp", channels=0), "channels must be a positive int"),
        (dict(head="dpt", channels=[64]), "channels must be a positive int"),
        (dict(num_classes=0), "num_classes must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, message):
    kwargs = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ValueError, match=message):
        DenseSegmenter(tiny_vit(8, depth=4), **kwargs)


def test_too_many_taps():
    with pytest.raises(ValueError, match="head 'dpt' takes at most 4 taps, one per level 1/4"):
        DenseSegmenter(tiny_vit(8, depth=6), NUM_CLASSES, "dpt", taps=[0, 1, 2, 3, 5])
    # unet and linear take any number.
    DenseSegmenter(tiny_vit(8, depth=6), NUM_CLASSES, "unet", taps=[0, 1, 2, 3, 5])


@pytest.mark.parametrize("patch, img_size", [(14, (28, 42)), (2, (8, 12))])
def test_patch_size_must_be_a_power_of_two_from_4(patch, img_size):
    with pytest.raises(ValueError, match=f"patch size must be a power of two >= 4, got {patch}"):
        DenseSegmenter(tiny_vit(patch, img_size), NUM_CLASSES, "linear")


def test_pixel_cross_entropy_bad_inputs():
    criterion = PixelCrossEntropy(3)
    good = {"masks": torch.ones(1, 8, 8, dtype=torch.bool), "labels": torch.tensor([1])}
    logits = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="non-empty list"):
        criterion([], [good])
    with pytest.raises(ValueError, match="must be \\(B, 3, h, w\\)"):
        criterion([{"semantic_logits": torch.zeros(1, 4, 2, 2)}], [good])
    with pytest.raises(ValueError, match="batch size 1 but 2 targets"):
        criterion([{"semantic_logits": logits}], [good, good])
    bad = {"masks": good["masks"], "labels": torch.tensor([3])}
    with pytest.raises(ValueError, match="values must lie in \\[0, 3\\), got min 3 max 3"):
        criterion([{"semantic_logits": logits}], [bad])
    bad = {"masks": torch.ones(8, 8, dtype=torch.bool), "labels": torch.tensor([1])}
    with pytest.raises(ValueError, match="must be \\(N, H, W\\) and \\(N,\\)"):
        criterion([{"semantic_logits": logits}], [bad])
    with pytest.raises(ValueError, match="ignore_index 2 is one of the 3 classes"):
        PixelCrossEntropy(3, ignore_index=2)
