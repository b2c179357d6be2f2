"""EoMT: the Encoder-only Mask Transformer (Kerssies et al., CVPR 2025).

A plain ViT segments images by itself: K learnable queries join the tokens before the last
L2 blocks, and a light head turns each query into a class and a mask. During training the
queries may attend only to the patches inside their predicted mask (masked attention); mask
annealing turns that off block by block, so inference runs the plain ViT with fused attention.

    images -> patch + prefix tokens -> L1 blocks -> [queries, tokens] -> L2 blocks -> head

`MaskTransformer` holds what EoMT shares with PMT (`eomt/modeling/pmt.py`, the same head and
masked attention on new blocks after a frozen encoder): the queries, the class and mask heads,
the upscaling of the patch tokens, and the attention masks with their annealed probabilities.
"""

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from eomt.modeling.backbone import embed_tokens
from eomt.modeling.token_merging import TokenMerging

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


class MaskTransformer(nn.Module):
    """The query side of EoMT and PMT on a timm ViT `backbone`.

    Tokens are laid out [queries, prefix (class, registers), patches]. Before each of the
    `num_query_blocks` blocks that see the queries, while masked attention is active, the
    prediction of the tokens so far gives each query an attention mask; the last prediction
    comes after the last block. `attn_mask_probs` (one per block) is the probability that a
    query keeps its mask. The trainer anneals it with Python floats (`set_attn_mask_probs`,
    scalar fills on the device) and the forward compares random draws with it on the device:
    no host synchronisation, and one compiled graph whatever the values (Python floats read
    by the forward would be specialised by torch.compile: one recompilation per block).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_queries: int,
        num_query_blocks: int,
        masked_attn: str,
    ):
        super().__init__()
        if masked_attn not in MASKED_ATTN_MODES:
            raise ValueError(f"masked_attn must be one of {MASKED_ATTN_MODES}, got {masked_attn!r}")
        patch_size = backbone.patch_embed.patch_size[0]
        if patch_size < 4 or patch_size & (patch_size - 1):
            raise ValueError(f"patch size must be a power of two >= 4, got {patch_size}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_query_blocks = num_query_blocks
        self.masked_attn = masked_attn
        dim = backbone.embed_dim
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
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

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    @property
    def masked_attn_active(self) -> bool:
        return self.masked_attn == "always" or (self.masked_attn == "anneal" and self.training)

    def set_attn_mask_probs(self, probs: list[float]) -> None:
        """The probability, per query block, that a query's attention follows its mask."""
        if len(probs) != self.num_query_blocks:
            raise ValueError(f"{len(probs)} probabilities for {self.num_query_blocks} blocks")
        for i, p in enumerate(probs):
            self.attn_mask_probs[i] = float(p)  # a fill with a scalar: no copy from the host

    def decode(self, x: torch.Tensor, norm: nn.Module, **block_kwargs) -> list[dict]:
        """Tokens [prefix, patches] -> predictions: the queries join them, then pass the query
        blocks; while masked attention is active each block attends within the masks of the
        prediction made before it (kept, as the loss supervises it), then the final one."""
        x = torch.cat((self.queries.weight.expand(x.shape[0], -1, -1), x), dim=1)
        masked = self.masked_attn_active
        predictions = []
        for block, prob in zip(self.query_blocks, self.attn_mask_probs):
            attn_mask = None
            if masked:
                prediction = self.predict(norm(x))
                predictions.append(prediction)
                attn_mask = self.attention_mask(prediction["mask_logits"], prob)
            x = block(x, attn_mask=attn_mask, **block_kwargs)
        predictions.append(self.predict(norm(x)))
        return predictions

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised tokens [queries, prefix, patches] -> class and mask logits per query."""
        queries = x[:, : self.num_queries]
        patches = x[:, self.num_queries + self.backbone.num_prefix_tokens :]
        grid = patches.transpose(1, 2).reshape(
            x.shape[0], x.shape[2], *self.backbone.patch_embed.grid_size
        )
        pixel_features = self.upscale(grid)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), pixel_features)
        return {"mask_logits": mask_logits, "class_logits": self.class_head(queries)}

    def attention_mask(self, mask_logits: torch.Tensor, prob) -> torch.Tensor:
        """Boolean attention mask (B, 1, N, N), True = may attend.

        Only the query-to-patch entries follow the predicted masks (logit > 0 on the patch
        grid); each query keeps its mask with probability `prob` (a float or a 0-d tensor),
        else attends everywhere. The draw is made whatever `prob` is: no branch on its value.
        """
        batch, num_queries = mask_logits.shape[:2]
        grid = self.backbone.patch_embed.grid_size
        may_attend = F.interpolate(mask_logits, grid, mode="bilinear") > 0
        dropped = torch.rand(batch, num_queries, device=mask_logits.device) >= prob
        may_attend = may_attend | dropped[:, :, None, None]
        first_patch = num_queries + self.backbone.num_prefix_tokens
        num_tokens = first_patch + grid[0] * grid[1]
        attn_mask = torch.ones(
            batch, num_tokens, num_tokens, dtype=torch.bool, device=mask_logits.device
        )
        attn_mask[:, :num_queries, first_patch:] = may_attend.flatten(2)
        return attn_mask[:, None]


class EoMT(MaskTransformer):
    """EoMT on a timm ViT.

    Args:
        backbone: a timm ViT (`blocks`, `norm`, `patch_embed`, `_pos_embed`, `num_prefix_tokens`).
        num_classes: C; the class head predicts C + 1 logits, the last one is "no object".
        num_queries: K learnable queries.
        num_query_blocks: L2, how many of the last blocks process the queries.
        masked_attn: "anneal" (masked attention in training, annealed by the trainer through
            `set_attn_mask_probs`, off at inference), "always" (masked in training and
            inference) or "never" (no masked attention and no intermediate predictions).
        token_merging: ALGM token merging (`eomt/modeling/token_merging.py`), or None for none.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_queries: int = 200,
        num_query_blocks: int = 4,
        masked_attn: str = "anneal",
        token_merging: TokenMerging | None = None,
    ):
        if not 1 <= num_query_blocks <= len(backbone.blocks):
            raise ValueError(
                f"num_query_blocks={num_query_blocks} must be in 1..{len(backbone.blocks)}"
            )
        super().__init__(backbone, num_classes, num_queries, num_query_blocks, masked_attn)
        # Rotary position embeddings (EVA-02, DINOv3) rotate only the tokens after the prefix:
        # in the query blocks the queries are part of that prefix, as they have no position.
        for block in self.query_blocks:
            if hasattr(block.attn, "num_prefix_tokens"):
                block.attn.num_prefix_tokens = backbone.num_prefix_tokens + num_queries
        if token_merging is not None:
            token_merging.check(self)
        self.token_merging = token_merging

    @property
    def query_blocks(self) -> nn.ModuleList:
        return self.backbone.blocks[len(self.encoder_blocks) :]

    @property
    def encoder_blocks(self) -> nn.ModuleList:
        """The blocks before the query blocks (L1), which see no query."""
        return self.backbone.blocks[: len(self.backbone.blocks) - self.num_query_blocks]

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (N, 3, H, W) in [0, 1] -> prefix and patch tokens, and the rotary embedding
        (or None)."""
        return embed_tokens(self.backbone, (images - self.pixel_mean) / self.pixel_std)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Images (N, 3, H, W) in [0, 1] -> the tokens after the blocks before the query
        blocks, and the blocks' keyword arguments (the rotary embedding, if any)."""
        x, rope = self.embed(images)
        block_kwargs = {} if rope is None else {"rope": rope}
        for block in self.encoder_blocks:
            x = block(x, **block_kwargs)
        return x, block_kwargs

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Images (B, 3, H, W) in [0, 1] -> predictions, one per supervised depth.

        Each prediction holds `mask_logits` (B, K, H/4, W/4) and `class_logits` (B, K, C+1).
        While masked attention is active there is one before every query block, then the final
        one; otherwise only the final one is computed.
        """
        if self.token_merging is not None:  # it refuses rotary embeddings
            return self.token_merging(self, self.embed(images)[0])
        x, block_kwargs = self.encode(images)
        return self.decode(x, self.backbone.norm, **block_kwargs)
