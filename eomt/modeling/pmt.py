"""PMT: the Plain Mask Transformer (Cavagnero et al., CVPR 2026 workshops; tue-mps/pmt).

EoMT's queries and masked attention on a frozen, shareable encoder. The encoder runs once; the
tokens of a few of its blocks (taps), each through the encoder's final norm and a BatchNorm,
are fused by residual MLPs and learned scales into one token sequence; the queries join it in
new blocks of DINOv3's kind (rotary position embeddings, layer scale), whose predictions come
from EoMT's head.

    images -> tokens -> encoder blocks (taps -> final norm -> BatchNorm)
           -> sum of scale * (f + MLP(f)) -> [queries, tokens] -> new blocks -> head

The new blocks rotate the patch tokens with the encoder's rotary embedding when it has one
(DINOv3), else with one of their own (DINOv2), whose coordinates are rescaled at random in
training as the authors do. `tests/test_pmt.py` and `docs/pmt.md` compare it with their code.
"""

import torch
from timm.layers import RotaryEmbeddingDinoV3
from timm.models.eva import EvaBlock
from torch import nn

from eomt.modeling.backbone import default_taps, tap_blocks
from eomt.modeling.eomt import MaskTransformer

ROPE_TEMPERATURE = 100.0  # DINOv3's rotary base
ROPE_RESCALE = 2.0  # the authors' training-time coordinate rescaling, log-uniform in [1/2, 2]


class PMT(MaskTransformer):
    """PMT on a timm ViT (DINOv2) or Eva (DINOv3) encoder.

    Args:
        backbone: the encoder, a timm ViT or Eva; freeze it for PMT proper
            (`eomt.modeling.freeze_blocks(backbone, -1)`), which then stays in eval mode.
        num_classes: C; the class head predicts C + 1 logits, the last one is "no object".
        num_queries: K learnable queries.
        num_blocks: the new blocks that process the queries (6 in the authors' configs).
        taps: the encoder blocks whose tokens are fused (default: 4 evenly spaced, the last
            included); blocks after the last tap are never run, and do not train.
        mlp_dim: the new blocks' MLP width (default 4x the encoder's width, as the authors'
            code; their configs set it to the width).
        masked_attn: as EoMT's, over the new blocks.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_queries: int = 200,
        num_blocks: int = 6,
        taps: list[int] | None = None,
        mlp_dim: int | None = None,
        masked_attn: str = "anneal",
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be at least 1")
        depth = len(backbone.blocks)
        taps = default_taps(depth) if taps is None else sorted(int(t) for t in taps)
        if not taps or not all(0 <= t < depth for t in taps) or len(set(taps)) < len(taps):
            raise ValueError(f"taps {taps} must be distinct blocks of 0..{depth - 1}")
        super().__init__(backbone, num_classes, num_queries, num_blocks, masked_attn)
        self.taps = taps
        for block in backbone.blocks[taps[-1] + 1 :]:
            block.requires_grad_(False)
        dim = backbone.embed_dim
        num_heads = backbone.blocks[0].attn.num_heads
        self.tap_norms = nn.ModuleList(nn.BatchNorm1d(dim) for _ in taps)
        self.lateral_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim))
            for _ in taps
        )
        self.lateral_scales = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in taps)
        # An encoder with rotary embeddings lends them, in its own layout; else DINOv3's.
        self.rope, rotate_half = None, True
        if getattr(backbone, "rope", None) is not None:
            rotate_half = backbone.blocks[0].attn.rotate_half
        else:
            self.rope = RotaryEmbeddingDinoV3(
                dim // num_heads,
                temperature=ROPE_TEMPERATURE,
                feat_shape=list(backbone.patch_embed.grid_size),
                rescale_coords=ROPE_RESCALE,
            )
        hidden = mlp_dim or 4 * dim
        # timm takes the width as a ratio and truncates dim * ratio: nudge it up to `hidden`.
        ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim
        self.blocks = nn.ModuleList(
            EvaBlock(
                dim,
                num_heads,
                mlp_ratio=ratio,
                num_prefix_tokens=num_queries + backbone.num_prefix_tokens,
                rotate_half=rotate_half,
                init_values=1.0,
                norm_layer=nn.LayerNorm,
            )
            for _ in range(num_blocks)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        # As nn.Linear initialises the authors' separate query and value projections.
        for block in self.blocks:
            for bias in (block.attn.q_bias, block.attn.v_bias):
                nn.init.uniform_(bias, -(dim**-0.5), dim**-0.5)

    @property
    def query_blocks(self) -> nn.ModuleList:
        return self.blocks

    def train(self, mode: bool = True) -> "PMT":
        """A frozen encoder stays in eval mode (as the authors' Lightning leaves it)."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Images (B, 3, H, W) in [0, 1] -> predictions, as EoMT's: one before every new block
        while masked attention is active, then the final one."""
        features, rope = tap_blocks(
            self.backbone, (images - self.pixel_mean) / self.pixel_std, self.taps
        )
        if self.rope is not None:
            rope = self.rope.get_embed()
        fused = []
        for feature, norm, mlp, scale in zip(
            features, self.tap_norms, self.lateral_mlps, self.lateral_scales
        ):
            feature = norm(feature.transpose(1, 2)).transpose(1, 2)
            fused.append((feature + mlp(feature)) * scale)
        return self.decode(torch.stack(fused).sum(0), self.decoder_norm, rope=rope)
