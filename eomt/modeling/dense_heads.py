"""Dense per-pixel segmentation heads on a plain timm ViT, and their per-pixel loss.

One model, `DenseSegmenter`, taps the patch tokens of a few blocks and decodes them with one of
the heads below into semantic logits at 1/4 of the image, the resolution of EoMT's masks:

    images -> patch + prefix tokens -> blocks (tapped) -> (B, D, H/p, W/p) grids -> head -> logits

- `linear`: a linear classifier on each patch token, logits upsampled (DINOv2's linear probe
  without BatchNorm, SETR-naive);
- `mlp`: SegFormer's all-MLP decoder, on a ViTDet-style simple pyramid of the taps;
- `unet`: progressive x2 upsampling with skip features from earlier taps (and an optional
  convolutional stem on the image), as in TransUNet / UNETR;
- `dpt`: DPT's reassemble (taps to 1/4, 1/8, 1/16, 1/32) and fusion decoder.

The prefix tokens (class, registers) are dropped, as DPT's "ignore" readout does.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eomt.modeling.backbone import default_taps, tap_blocks
from eomt.modeling.criterion import check_targets
from eomt.modeling.eomt import IMAGENET_MEAN, IMAGENET_STD

DENSE_HEADS = ("linear", "mlp", "unet", "dpt")
PYRAMID_STRIDES = (4, 8, 16, 32)  # the levels of the mlp and dpt heads, one per tap


def resample(dim: int, out_dim: int, stride: int, out_stride: int, down: str = "conv") -> nn.Module:
    """A map at 1/`stride` -> 1/`out_stride`, both powers of two: up by a transposed conv with
    kernel = stride = the factor (DPT, ViTDet), the same scale by the identity (or a 1x1 conv
    when the width changes), down by a max-pool (`down="pool"`, ViTDet) or by 3x3 stride-2
    convs, one per factor 2 (`"conv"`, DPT's, which keeps the kernels small for wide ViTs)."""
    if out_stride < stride:
        factor = stride // out_stride
        return nn.ConvTranspose2d(dim, out_dim, factor, stride=factor)
    if out_stride == stride:
        return nn.Identity() if dim == out_dim else nn.Conv2d(dim, out_dim, 1)
    if down == "pool":
        factor = out_stride // stride
        if dim != out_dim:
            raise ValueError(f"a max-pool keeps the width: {dim} -> {out_dim}")
        return nn.MaxPool2d(factor, factor, ceil_mode=True)
    steps = range(int(math.log2(out_stride // stride)))
    convs = [nn.Conv2d(out_dim if i else dim, out_dim, 3, stride=2, padding=1) for i in steps]
    return nn.Sequential(*convs)


def level_width(dim: int, patch_size: int, stride: int) -> int:
    """Width of a pyramid level: upsampling by f divides the ViT's width by f, so every level
    holds about as many numbers as the token grid (ViTDet, DPT-L: 256, 512, 1024, 1024)."""
    return max(dim * min(stride, patch_size) // patch_size, 1)


def conv_bn_relu(dim: int, out_dim: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(dim, out_dim, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(inplace=True),
    )


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


class LinearHead(nn.Module):
    """A linear classifier on each patch token (of the taps, concatenated, when there are
    several: DINOv2's multi-layer probe), logits upsampled bilinearly."""

    def __init__(self, dim: int, num_taps: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Conv2d(dim * num_taps, num_classes, 1)

    def forward(self, features: list[Tensor], images: Tensor) -> Tensor:
        logits = self.classifier(torch.cat(features, dim=1))
        return upsample(logits, (images.shape[-2] // 4, images.shape[-1] // 4))


class MLPHead(nn.Module):
    """SegFormer's all-MLP decoder. A plain ViT has one resolution, so the taps first become a
    pyramid at 1/4, 1/8, 1/16, 1/32 (shallowest finest; ViTDet's simple pyramid); then per level
    a linear projection to `channels`, upsampling to 1/4, concatenation, a 1x1 fuse conv with BN
    and GELU, dropout and a 1x1 classifier. Where the pyramid's step is linear (transposed conv
    up, identity) the projection is folded into it: one map from the tokens to `channels` per
    level; the 1/32 level max-pools the tokens, then projects them."""

    def __init__(self, dim: int, patch_size: int, num_taps: int, channels: int, num_classes: int):
        super().__init__()
        self.levels = nn.ModuleList(
            resample(dim, channels, patch_size, stride)
            if stride <= patch_size
            else nn.Sequential(
                resample(dim, dim, patch_size, stride, down="pool"), nn.Conv2d(dim, channels, 1)
            )
            for stride in PYRAMID_STRIDES[:num_taps]
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(channels * num_taps, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.GELU(),
        )
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[Tensor], images: Tensor) -> Tensor:
        size = (images.shape[-2] // 4, images.shape[-1] // 4)
        levels = [upsample(level(f), size) for f, level in zip(features, self.levels)]
        return self.classifier(self.dropout(self.fuse(torch.cat(levels, dim=1))))


class UNetHead(nn.Module):
    """Progressive upsampling from the deepest tap at 1/patch to 1/4, x2 per stage, each stage
    concatenating skip features (earlier taps resampled to its scale) before two conv3x3-BN-ReLU.

    `channels` gives each stage's width, coarse to fine (log2(patch) - 1 stages: 1/16, 1/8, 1/4
    for patch 16). The earlier taps are spread evenly over the stages, the shallowest at the
    finest. The optional stem (two stride-2 conv3x3-BN-ReLU on the image, 1/2 then 1/4) adds
    the image's own detail at 1/4, which the 1/patch tokens lack; its 1/2 map only feeds its
    1/4 one, since the classifier works at 1/4.
    """

    def __init__(
        self,
        dim: int,
        patch_size: int,
        num_taps: int,
        channels: list[int],
        num_classes: int,
        stem: bool = False,
    ):
        super().__init__()
        self.strides = [patch_size >> i for i in range(len(channels))]
        num_skips, num_stages = num_taps - 1, len(channels)
        # Skip k (deepest first) goes to stage stage_of_skip[k].
        self.stage_of_skip = [
            num_stages - 1 - (num_skips - 1 - k) * num_stages // num_skips for k in range(num_skips)
        ]
        self.skips = nn.ModuleList(
            resample(dim, channels[s], patch_size, self.strides[s]) for s in self.stage_of_skip
        )
        self.stem = None
        if stem:
            self.stem = nn.Sequential(
                conv_bn_relu(3, max(channels[-1] // 2, 1), stride=2),
                conv_bn_relu(max(channels[-1] // 2, 1), channels[-1], stride=2),
            )
        self.stages = nn.ModuleList()
        for i, width in enumerate(channels):
            in_dim = dim if i == 0 else channels[i - 1]
            in_dim += width * self.stage_of_skip.count(i)
            in_dim += width if stem and i == num_stages - 1 else 0
            self.stages.append(
                nn.Sequential(conv_bn_relu(in_dim, width), conv_bn_relu(width, width))
            )
        self.classifier = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, features: list[Tensor], images: Tensor) -> Tensor:
        *earlier, x = features
        skips = [[] for _ in self.stages]
        for feature, stage, skip in zip(reversed(earlier), self.stage_of_skip, self.skips):
            skips[stage].append(skip(feature))
        if self.stem is not None:
            skips[-1].append(self.stem(images))
        for i, (stride, block) in enumerate(zip(self.strides, self.stages)):
            if i > 0:
                x = upsample(x, (images.shape[-2] // stride, images.shape[-1] // stride))
            x = block(torch.cat([x, *skips[i]], dim=1))
        return self.classifier(x)


class ResidualConvUnit(nn.Module):
    """DPT's residual unit: x + conv3x3(relu(conv3x3(relu(x))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT's fusion at one scale: the reassembled map through a residual unit, plus the coarser
    path upsampled to this scale, through a second residual unit and a 1x1 conv. (DPT skips the
    first unit on the coarsest map; here every unit is used, so none is left without gradient.)"""

    def __init__(self, dim: int):
        super().__init__()
        self.skip_unit = ResidualConvUnit(dim)
        self.unit = ResidualConvUnit(dim)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, coarser: Tensor | None) -> Tensor:
        x = self.skip_unit(x)
        if coarser is not None:
            x = x + upsample(coarser, x.shape[-2:])
        return self.out(self.unit(x))


class DPTHead(nn.Module):
    """DPT: reassemble each tap to one scale (1x1 conv projection, then transposed conv x4, x2,
    identity or strided conv for patch 16; 3x3 conv to `channels`), fuse from coarse to fine,
    and classify at 1/4 (conv3x3-BN-ReLU, dropout, 1x1 conv; DPT upsamples further, here the
    loss and the inference do)."""

    def __init__(self, dim: int, patch_size: int, num_taps: int, channels: int, num_classes: int):
        super().__init__()
        strides = PYRAMID_STRIDES[:num_taps]
        self.reassemble = nn.ModuleList()
        for stride in strides:
            width = level_width(dim, patch_size, stride)
            self.reassemble.append(
                nn.Sequential(
                    nn.Conv2d(dim, width, 1),
                    resample(width, width, patch_size, stride, down="conv"),
                    nn.Conv2d(width, channels, 3, padding=1, bias=False),
                )
            )
        self.fusion = nn.ModuleList(FusionBlock(channels) for _ in strides)
        self.head = nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, features: list[Tensor], images: Tensor) -> Tensor:
        levels = [reassemble(f) for f, reassemble in zip(features, self.reassemble)]
        path = None
        for level, fusion in zip(reversed(levels), reversed(self.fusion)):
            path = fusion(level, path)
        return self.head(path)


class DenseSegmenter(nn.Module):
    """A timm ViT with a dense per-pixel head, for semantic segmentation.

    Args:
        backbone: a timm ViT (`blocks`, `norm`, `patch_embed`, `_pos_embed`, `num_prefix_tokens`).
        num_classes: C, the logits per pixel (no "no object" class).
        head: one of `DENSE_HEADS`.
        taps: the blocks whose patch tokens the head reads, strictly increasing, each through
            the backbone's final norm as PMT reads them (blocks after the last are not run and
            do not train). Default: the last block for `linear`, `default_taps(depth)` for the
            others (`mlp` and `dpt` take at most 4, one per level 1/4 .. 1/32).
        channels: the decoder's width: `mlp` and `dpt` min(256, D); `unet` the width at
            1/patch, halved per x2 stage (default min(256, D): [256, 128, 64] for patch 16), or
            a list of one width per stage, coarse to fine. `linear` has none.
        stem: `unet` only: a small convolutional stem on the image gives a 1/4 skip feature.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: str = "linear",
        taps: list[int] | None = None,
        channels: int | list[int] | None = None,
        stem: bool = False,
    ):
        super().__init__()
        if head not in DENSE_HEADS:
            raise ValueError(f"head must be one of {list(DENSE_HEADS)}, got {head!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        patch_size = backbone.patch_embed.patch_size[0]
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ValueError(f"patch size must be a power of two >= 4, got {patch_size}")
        depth, dim = len(backbone.blocks), backbone.embed_dim
        if taps is None:
            taps = [depth - 1] if head == "linear" else default_taps(depth)
        taps = [int(t) for t in taps]
        if not taps or any(not 0 <= t < depth for t in taps):
            raise ValueError(f"taps {taps} must be a non-empty list of blocks in 0..{depth - 1}")
        if any(a >= b for a, b in zip(taps, taps[1:])):
            raise ValueError(f"taps {taps} must be strictly increasing (shallow to deep)")
        if head in ("mlp", "dpt") and len(taps) > len(PYRAMID_STRIDES):
            raise ValueError(
                f"head {head!r} takes at most {len(PYRAMID_STRIDES)} taps, one per level "
                f"1/{', 1/'.join(map(str, PYRAMID_STRIDES))}; got {len(taps)}: {taps}"
            )
        if stem and head != "unet":
            raise ValueError(f"stem=True is an option of head 'unet' only, not {head!r}")
        if head == "linear" and channels is not None:
            raise ValueError("head 'linear' has no channels (it classifies the tokens directly)")

        self.backbone = backbone
        self.num_classes = num_classes
        self.taps = taps
        for block in backbone.blocks[taps[-1] + 1 :]:
            block.requires_grad_(False)
        self.patch_size = patch_size
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

        if head == "linear":
            self.head = LinearHead(dim, len(taps), num_classes)
        elif head == "unet":
            num_stages = int(math.log2(patch_size)) - 1  # 1/patch .. 1/4
            if channels is None:
                channels = min(256, dim)
            if isinstance(channels, int):
                channels = [max(channels >> i, 1) for i in range(num_stages)]
            channels = [int(c) for c in channels]
            if len(channels) != num_stages or min(channels) < 1:
                raise ValueError(
                    f"head 'unet' with patch {patch_size} has {num_stages} stages (1/{patch_size}"
                    f" .. 1/4): channels must be one positive int or {num_stages} of them, "
                    f"got {channels}"
                )
            self.head = UNetHead(dim, patch_size, len(taps), channels, num_classes, stem)
        else:
            channels = min(256, dim) if channels is None else channels
            if not isinstance(channels, int) or channels < 1:
                raise ValueError(f"head {head!r}: channels must be a positive int, got {channels}")
            cls = MLPHead if head == "mlp" else DPTHead
            self.head = cls(dim, patch_size, len(taps), channels, num_classes)
        self.channels = channels

    def forward(self, images: Tensor) -> list[dict[str, Tensor]]:
        """Images (B, 3, H, W) in [0, 1] -> [{"semantic_logits": (B, C, H/4, W/4)}], a list like
        EoMT's predictions (with one entry)."""
        images = (images - self.pixel_mean) / self.pixel_std
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        tokens, _ = tap_blocks(self.backbone, images, self.taps)
        prefix = self.backbone.num_prefix_tokens
        features = [t[:, prefix:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in tokens]
        return [{"semantic_logits": self.head(features, images)}]


def label_map(targets: list[dict], ignore_index: int = 255) -> Tensor:
    """Per-image masks and labels -> a (B, H, W) int64 map of labels, `ignore_index` where no
    mask covers the pixel (a later mask wins where masks overlap)."""
    maps = []
    for target in targets:
        masks, labels = target["masks"], target["labels"]
        labels_map = torch.full(
            masks.shape[-2:], ignore_index, dtype=torch.long, device=masks.device
        )
        for mask, label in zip(masks, labels):
            labels_map[mask] = label
        maps.append(labels_map)
    return torch.stack(maps)


class PixelCrossEntropy(nn.Module):
    """Per-pixel cross-entropy of the final prediction's `semantic_logits`, upsampled bilinearly
    to the targets' size, averaged over the pixels that some mask covers."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__()
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is one of the {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def forward(
        self, predictions: list[dict], targets: list[dict], num_masks: float | None = None
    ) -> dict[str, Tensor]:
        """`targets` as the trainer gives them: per image {"masks": (N, H, W) bool, "labels":
        (N,) int64}. `num_masks` is the trainer's mask count for the mask losses: unused."""
        if not predictions:
            raise ValueError("predictions: expected a non-empty list with 'semantic_logits'")
        logits = predictions[-1]["semantic_logits"]
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"semantic_logits {tuple(logits.shape)} must be (B, {self.num_classes}, h, w)"
            )
        if logits.shape[0] != len(targets):
            raise ValueError(f"batch size {logits.shape[0]} but {len(targets)} targets")
        check_targets(targets, self.num_classes)
        labels = label_map(targets, self.ignore_index)
        logits = upsample(logits.float(), labels.shape[-2:])
        # Summed then divided by the labelled pixels (at least 1): the mean, and 0 rather than
        # NaN for a batch with every pixel ignored.
        ce = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
        ce = ce / (labels != self.ignore_index).sum().clamp(min=1)
        return {"loss_ce": ce, "loss": ce}
