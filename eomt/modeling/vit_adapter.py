"""ViT-Adapter (Chen et al., ICLR 2023): multi-scale features for dense prediction from a plain ViT.

A small convolutional branch, the spatial prior module, sees the image at strides 8, 16 and 32.
The ViT runs its blocks in four groups; before each group an injector lets the patch tokens
attend deformably to the spatial features, and after it an extractor lets the spatial features
attend deformably to the patch tokens. The outputs are four maps at strides 4, 8, 16 and 32.

    images -> spatial prior (c1 at 1/4; c = [c2, c3, c4] at 1/8, 1/16, 1/32)
    for each group: tokens += gamma * attn(tokens -> c); tokens = blocks(tokens);
                    c += attn(c -> tokens); c += ConvFFN(c)
    then two extra extractors; outputs = norm(c_i + resized tokens), c1 += upsampled c2
"""

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from eomt.modeling.backbone import embed_tokens
from eomt.modeling.ms_deform_attn import MSDeformAttn

PATCH_SIZE = 16
NUM_INTERACTIONS = 4


def default_interaction_indexes(depth: int) -> list[list[int]]:
    """[first, last] block of each of four equal groups: 12 blocks -> [[0, 2], ..., [9, 11]]."""
    if depth % NUM_INTERACTIONS:
        raise ValueError(
            f"a ViT of depth {depth} does not split into {NUM_INTERACTIONS} equal groups: "
            "pass interaction_indexes"
        )
    size = depth // NUM_INTERACTIONS
    return [[i * size, (i + 1) * size - 1] for i in range(NUM_INTERACTIONS)]


def level_start_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    areas = spatial_shapes.prod(1)
    return torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))


def pixel_centres(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Normalised (x, y) centres of the pixels of every map, concatenated: (1, sum h*w, 1, 2)."""
    centres = []
    for height, width in shapes:
        y, x = torch.meshgrid(
            (torch.arange(height, device=device) + 0.5) / height,
            (torch.arange(width, device=device) + 0.5) / width,
            indexing="ij",
        )
        centres.append(torch.stack((x.reshape(-1), y.reshape(-1)), -1))
    return torch.cat(centres)[None, :, None]


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class SpatialPriorModule(nn.Module):
    """Convolutional features at strides 4, 8, 16 and 32, each projected to `embed_dim`."""

    def __init__(self, inplanes: int, embed_dim: int):
        super().__init__()
        self.stem = nn.Sequential(
            *conv_bn_relu(3, inplanes, stride=2),
            *conv_bn_relu(inplanes, inplanes, stride=1),
            *conv_bn_relu(inplanes, inplanes, stride=1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*conv_bn_relu(inplanes, 2 * inplanes, stride=2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * inplanes, 4 * inplanes, stride=2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * inplanes, 4 * inplanes, stride=2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [c1, c2, c3, c4], (B, embed_dim, H / s, W / s) for s = 4, 8, 16, 32."""
        c1 = self.stem(images)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]


class MultiScaleDWConv(nn.Module):
    """One depthwise 3x3 convolution applied to each level of a flattened multi-scale sequence."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        levels = x.split([h * w for h, w in shapes], dim=1)
        out = []
        for level, (height, width) in zip(levels, shapes):
            grid = level.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
            out.append(self.dwconv(grid).flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """Linear, depthwise 3x3 convolution per level, GELU, linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = MultiScaleDWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), shapes)))


class Injector(nn.Module):
    """Patch tokens attend to the spatial features; the result is scaled per channel by `gamma`,
    zero at initialisation so that the pretrained ViT starts undisturbed."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(
            dim, n_levels=3, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens, reference_points, feats, spatial_shapes, start_index):
        attn = self.attn(
            self.query_norm(tokens),
            reference_points,
            self.feat_norm(feats),
            spatial_shapes,
            start_index,
        )
        return tokens + self.gamma * attn


class Extractor(nn.Module):
    """Spatial features attend to the patch tokens, then a ConvFFN refines them."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float,
        drop_path: float,
    ):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(
            dim, n_levels=1, n_heads=num_heads, n_points=n_points, ratio=deform_ratio
        )
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, feats, reference_points, tokens, spatial_shapes, start_index, feat_shapes):
        feats = feats + self.attn(
            self.query_norm(feats),
            reference_points,
            self.feat_norm(tokens),
            spatial_shapes,
            start_index,
        )
        return feats + self.drop_path(self.ffn(self.ffn_norm(feats), feat_shapes))


class InteractionBlock(nn.Module):
    """Injector, a group of ViT blocks, extractor (and, for the last group, extra extractors)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_points: int,
        deform_ratio: float,
        cffn_ratio: float,
        drop_path: float,
        num_extra_extractors: int,
    ):
        super().__init__()
        extractor_args = (dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path)
        self.injector = Injector(dim, num_heads, n_points, deform_ratio)
        self.extractor = Extractor(*extractor_args)
        self.extra_extractors = nn.ModuleList(
            Extractor(*extractor_args) for _ in range(num_extra_extractors)
        )


class ViTAdapter(nn.Module):
    """ViT-Adapter around a timm ViT with 16x16 patches (as built by `eomt.modeling.build_vit`).

    The prefix tokens (class, registers) go through every block; only the patch tokens take
    part in the interactions. The ViT's final norm is not used (the adapter reads the tokens
    before it), so it is replaced by an identity and leaves no parameter without a gradient.
    The normalisations are BatchNorm2d (the official code uses SyncBatchNorm: convert with
    `nn.SyncBatchNorm.convert_sync_batchnorm` for multi-GPU training).

    Args:
        vit: the timm ViT; its blocks run in the interaction groups.
        interaction_indexes: [first, last] block of each group; None: four equal groups.
        deform_ratio: value width of the deformable attentions relative to the ViT width
            (0.5 for ViT-B/L/g, 1.0 for ViT-S in the official configs).
        n_points: sampling points per head and level.
        deform_num_heads: heads of the deformable attentions; None: those of the ViT.
        cffn_ratio: hidden width of the ConvFFN relative to the ViT width.
        conv_inplane: channels of the spatial prior module's stem.
        add_vit_feature: add the resized final patch tokens to every output.
        use_extra_extractor: two more extractors after the last interaction.
        drop_path: stochastic depth rate of the extractors' ConvFFN.
    """

    def __init__(
        self,
        vit: nn.Module,
        interaction_indexes: list[list[int]] | None = None,
        deform_ratio: float = 0.5,
        n_points: int = 4,
        deform_num_heads: int | None = None,
        cffn_ratio: float = 0.25,
        conv_inplane: int = 64,
        add_vit_feature: bool = True,
        use_extra_extractor: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        patch_size = tuple(vit.patch_embed.patch_size)
        if patch_size != (PATCH_SIZE, PATCH_SIZE):
            raise ValueError(f"ViT-Adapter needs 16x16 patches, the ViT has {patch_size}")
        depth = len(vit.blocks)
        if interaction_indexes is None:
            interaction_indexes = default_interaction_indexes(depth)
        expected_start = 0
        for first, last in interaction_indexes:
            if first != expected_start or last < first:
                raise ValueError(
                    f"interaction_indexes {interaction_indexes} must cover blocks "
                    f"0..{depth - 1} in consecutive groups"
                )
            expected_start = last + 1
        if expected_start != depth:
            raise ValueError(
                f"interaction_indexes {interaction_indexes} must end at block {depth - 1}"
            )
        if deform_num_heads is None:
            deform_num_heads = vit.blocks[0].attn.num_heads
        dim = vit.embed_dim
        vit.norm = nn.Identity()
        self.vit = vit
        self.embed_dim = dim
        self.interaction_indexes = [list(group) for group in interaction_indexes]
        self.add_vit_feature = add_vit_feature

        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim)
        last = len(interaction_indexes) - 1
        self.interactions = nn.ModuleList(
            InteractionBlock(
                dim,
                deform_num_heads,
                n_points,
                deform_ratio,
                cffn_ratio,
                drop_path,
                num_extra_extractors=2 if i == last and use_extra_extractor else 0,
            )
            for i in range(len(interaction_indexes))
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.norm1 = nn.BatchNorm2d(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.norm3 = nn.BatchNorm2d(dim)
        self.norm4 = nn.BatchNorm2d(dim)
        self.reset_parameters()

    def reset_parameters(self):
        """The official initialisation of everything but the ViT."""
        for module in (self.up, self.spm, self.interactions):
            module.apply(init_weights)
        for module in self.interactions.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def interact(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised images -> (final patch tokens (B, N, D), c1 (B, D, H/4, W/4),
        spatial features c = [c2, c3, c4] flattened (B, N2 + N3 + N4, D))."""
        height, width = images.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(
                f"ViT-Adapter needs an input size divisible by 32, got {height}x{width}"
            )
        device = images.device
        grid = (height // 16, width // 16)
        feat_shapes = [(height // s, width // s) for s in (8, 16, 32)]
        # Injector: patch tokens (queries) read c2, c3, c4; extractor: c reads the 1/16 tokens.
        injector_shapes = torch.tensor(feat_shapes, dtype=torch.long, device=device)
        injector_start = level_start_index(injector_shapes)
        injector_points = pixel_centres([grid], device).expand(-1, -1, 3, -1)
        extractor_shapes = torch.tensor([grid], dtype=torch.long, device=device)
        extractor_start = level_start_index(extractor_shapes)
        extractor_points = pixel_centres(feat_shapes, device)

        c1, *levels = self.spm(images)
        c = torch.cat(
            [
                level.flatten(2).transpose(1, 2) + embed
                for level, embed in zip(levels, self.level_embed)
            ],
            dim=1,
        )

        x, rope = embed_tokens(self.vit, images)
        block_kwargs = {} if rope is None else {"rope": rope}
        num_prefix = self.vit.num_prefix_tokens
        prefix, tokens = x[:, :num_prefix], x[:, num_prefix:]
        for interaction, (first, last) in zip(self.interactions, self.interaction_indexes):
            tokens = interaction.injector(
                tokens, injector_points, c, injector_shapes, injector_start
            )
            x = torch.cat((prefix, tokens), dim=1)
            for block in self.vit.blocks[first : last + 1]:
                x = block(x, **block_kwargs)
            prefix, tokens = x[:, :num_prefix], x[:, num_prefix:]
            for extractor in (interaction.extractor, *interaction.extra_extractors):
                c = extractor(
                    c, extractor_points, tokens, extractor_shapes, extractor_start, feat_shapes
                )
        return tokens, c1, c

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images (B, 3, H, W), H and W divisible by 32 -> four maps (B, D, H/s, W/s)
        for strides s = 4, 8, 16, 32."""
        batch, _, height, width = images.shape
        tokens, c1, c = self.interact(images)
        shapes = [(height // s, width // s) for s in (8, 16, 32)]
        c2, c3, c4 = (
            level.transpose(1, 2).reshape(batch, self.embed_dim, h, w)
            for level, (h, w) in zip(c.split([h * w for h, w in shapes], dim=1), shapes)
        )
        c1 = c1 + self.up(c2)
        if self.add_vit_feature:
            x3 = tokens.transpose(1, 2).reshape(batch, self.embed_dim, *shapes[1])
            c1 = c1 + F.interpolate(x3, scale_factor=4, mode="bilinear", align_corners=False)
            c2 = c2 + F.interpolate(x3, scale_factor=2, mode="bilinear", align_corners=False)
            c3 = c3 + x3
            c4 = c4 + F.interpolate(x3, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [self.norm1(c1), self.norm2(c2), self.norm3(c3), self.norm4(c4)]


def init_weights(module: nn.Module):
    """ViT-Adapter's init: truncated-normal linears, He-normal (fan-out) convs, unit norms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        fan_out //= module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
