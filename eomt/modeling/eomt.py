"""EoMT: the Encoder-only Mask Transformer (Kerssies et al., CVPR 2025).

A plain ViT segments images by itself: K learnable queries join the tokens before the last
L2 blocks, and a light head turns each query into a class and a mask. During training the
queries may attend only to the patches inside their predicted mask (masked attention); mask
annealing turns that off block by block, so inference runs the plain ViT with fused attention.

    images -> patch + prefix tokens -> L1 blocks -> [queries, tokens] -> L2 blocks -> head

With `taps` it is PMT (Plain Mask Transformer, Kerssies et al. 2026), the same method on a
frozen, shareable encoder: the whole ViT runs once, the tokens of 4 of its blocks are fused
(normalised, residual MLP, learned scale, summed), and the queries join them in L2 new blocks.

    images -> tokens -> all blocks (taps) -> fused tokens -> [queries, tokens] -> L2 new blocks
"""

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import Block
from torch import nn

from eomt.modeling.backbone import embed_tokens

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASKED_ATTN_MODES = ("anneal", "always", "never")


class ScaleBlock(nn.Module):
    """Resample features x2 (ViTDet): a 2x2 stride-2 transposed conv up (or conv down, for the
    baseline's feature pyramid), GELU, depthwise 3x3 conv, LayerNorm."""

    def __init__(self, dim: int, downsample: bool = False):
        super().__init__()
        conv = nn.Conv2d if downsample else nn.ConvTranspose2d
        self.conv1 = conv(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


class EoMT(nn.Module):
    """EoMT on a timm ViT.

    Args:
        backbone: a timm ViT (`blocks`, `norm`, `patch_embed`, `_pos_embed`, `num_prefix_tokens`).
        num_classes: C; the class head predicts C + 1 logits, the last one is "no object".
        num_queries: K learnable queries.
        num_query_blocks: L2, how many of the last blocks process the queries.
        masked_attn: "anneal" (masked attention in training, annealed by the trainer through
            `attn_mask_probs`, off at inference), "always" (masked in training and inference) or
            "never" (no masked attention and no intermediate predictions).
        taps: PMT: the backbone blocks whose tokens are fused (e.g. [5, 11, 17, 23] for ViT-L);
            the L2 query blocks are then new blocks of the backbone's width and heads.
        decoder_mlp_dim: PMT: the new blocks' MLP width (default: the backbone's width).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_queries: int = 200,
        num_query_blocks: int = 4,
        masked_attn: str = "anneal",
        taps: list[int] | None = None,
        decoder_mlp_dim: int | None = None,
    ):
        super().__init__()
        if masked_attn not in MASKED_ATTN_MODES:
            raise ValueError(f"masked_attn must be one of {MASKED_ATTN_MODES}, got {masked_attn!r}")
        if taps is None and not 1 <= num_query_blocks <= len(backbone.blocks):
            raise ValueError(
                f"num_query_blocks={num_query_blocks} must be in 1..{len(backbone.blocks)}"
            )
        if taps is not None and not (taps and all(0 <= t < len(backbone.blocks) for t in taps)):
            raise ValueError(f"taps {taps} must be blocks of 0..{len(backbone.blocks) - 1}")
        patch_size = backbone.patch_embed.patch_size[0]
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ValueError(f"patch size must be a power of two >= 4, got {patch_size}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_query_blocks = num_query_blocks
        self.masked_attn = masked_attn
        self.taps = None if taps is None else sorted(taps)
        dim = backbone.embed_dim
        if taps is not None:
            self.lateral_norms = nn.ModuleList(nn.BatchNorm1d(dim) for _ in taps)
            self.lateral_mlps = nn.ModuleList(
                nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim))
                for _ in taps
            )
            self.lateral_scales = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in taps)
            heads = backbone.blocks[0].attn.num_heads
            mlp_ratio = (decoder_mlp_dim or dim) / dim
            self.decoder_blocks = nn.ModuleList(
                Block(dim, heads, mlp_ratio, qkv_bias=True, init_values=1e-5)
                for _ in range(num_query_blocks)
            )
            self.decoder_norm = nn.LayerNorm(dim)

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        # Probability, per query block, that a query's attention follows its predicted mask.
        self.register_buffer("attn_mask_probs", torch.ones(num_query_blocks))

        self.queries = nn.Embedding(num_queries, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)
        )
        # Patch tokens sit at 1/patch_size; the masks are predicted at 1/4.
        self.upscale = nn.Sequential(
            *[ScaleBlock(dim) for _ in range(int(math.log2(patch_size)) - 2)]
        )
        # Rotary position embeddings (EVA-02, DINOv3) rotate only the tokens after the prefix:
        # in the query blocks the queries are part of that prefix, as they have no position.
        for block in self.query_blocks if taps is None else ():
            if hasattr(block.attn, "num_prefix_tokens"):
                block.attn.num_prefix_tokens = backbone.num_prefix_tokens + num_queries

    @property
    def query_blocks(self) -> nn.ModuleList:
        if self.taps is not None:
            return self.decoder_blocks
        return self.backbone.blocks[len(self.backbone.blocks) - self.num_query_blocks :]

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    @property
    def masked_attn_active(self) -> bool:
        return self.masked_attn == "always" or (self.masked_attn == "anneal" and self.training)

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Images (B, 3, H, W) in [0, 1] -> predictions, one per supervised depth.

        Each prediction holds `mask_logits` (B, K, H/4, W/4) and `class_logits` (B, K, C+1).
        While masked attention is active there is one before every query block, then the final
        one; otherwise only the final one is computed.
        """
        x, rope = embed_tokens(self.backbone, (images - self.pixel_mean) / self.pixel_std)
        block_kwargs = {} if rope is None else {"rope": rope}
        if self.taps is None:
            for block in self.backbone.blocks[: len(self.backbone.blocks) - self.num_query_blocks]:
                x = block(x, **block_kwargs)
        else:
            x = self.fuse_taps(x, block_kwargs)
            block_kwargs = {}  # the new blocks have no rotary embeddings
        x = torch.cat((self.queries.weight.expand(x.shape[0], -1, -1), x), dim=1)
        mask_probs = self.attn_mask_probs.tolist() if self.masked_attn_active else None
        predictions = []
        for i, block in enumerate(self.query_blocks):
            attn_mask = None
            if mask_probs is not None:
                prediction = self.predict(x)
                predictions.append(prediction)
                attn_mask = self.attention_mask(prediction["mask_logits"], mask_probs[i])
            x = block(x, attn_mask=attn_mask, **block_kwargs)
        predictions.append(self.predict(x))
        return predictions

    def fuse_taps(self, x: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """PMT: the sum over taps of scale * (f + MLP(f)), f the tap's batch-normalised tokens.
        A frozen encoder runs without autograd: nothing upstream of the fusion learns."""
        features = []
        with torch.no_grad() if self.backbone_frozen else nullcontext():
            for i, block in enumerate(self.backbone.blocks[: self.taps[-1] + 1]):
                x = block(x, **block_kwargs)
                if i in self.taps:
                    features.append(x)
        fused = 0
        for feature, norm, mlp, scale in zip(
            features, self.lateral_norms, self.lateral_mlps, self.lateral_scales
        ):
            feature = norm(feature.transpose(1, 2)).transpose(1, 2)
            fused = fused + scale * (feature + mlp(feature))
        return fused

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens [queries, prefix, patches] -> class logits and mask logits of each query."""
        x = self.backbone.norm(x) if self.taps is None else self.decoder_norm(x)
        queries = x[:, : self.num_queries]
        patches = x[:, self.num_queries + self.backbone.num_prefix_tokens :]
        grid = patches.transpose(1, 2).reshape(
            x.shape[0], x.shape[2], *self.backbone.patch_embed.grid_size
        )
        pixel_features = self.upscale(grid)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), pixel_features)
        return {"mask_logits": mask_logits, "class_logits": self.class_head(queries)}

    def attention_mask(self, mask_logits: torch.Tensor, prob: float) -> torch.Tensor | None:
        """Boolean attention mask (B, 1, N, N), True = may attend, or None when all is open.

        Only the query-to-patch entries follow the predicted masks (logit > 0 on the patch
        grid); each query keeps its mask with probability `prob`, else attends everywhere.
        """
        if prob <= 0:
            return None
        batch, num_queries = mask_logits.shape[:2]
        grid = self.backbone.patch_embed.grid_size
        may_attend = F.interpolate(mask_logits, grid, mode="bilinear") > 0
        if prob < 1:
            dropped = torch.rand(batch, num_queries, device=mask_logits.device) >= prob
            may_attend |= dropped[:, :, None, None]
        first_patch = num_queries + self.backbone.num_prefix_tokens
        num_tokens = first_patch + grid[0] * grid[1]
        attn_mask = torch.ones(
            batch, num_tokens, num_tokens, dtype=torch.bool, device=mask_logits.device
        )
        attn_mask[:, :num_queries, first_patch:] = may_attend.flatten(2)
        return attn_mask[:, None]
