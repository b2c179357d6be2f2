"""ALGM token merging for EoMT: fewer patch tokens through most blocks, masks at full size.

ALGM (Adaptive Local-then-Global Merging, Norouzi et al., CVPR 2024; the EoMT paper's token
merging table) merges the patch tokens of a plain ViT twice, each time between the attention
and the MLP of one block:

- Local merging, in the first block (ALGM's "layer 1", our `local_block` 0): the patch grid is
  cut into non-overlapping `window` x `window` windows; a window whose tokens have a mean
  pairwise cosine similarity (self pairs left out) of at least `threshold` becomes one token,
  their average. ALGM's defaults: window 2 x 2, threshold 0.88 (its ViT-S/ADE20K setting; it
  uses 0.9 for ViT-Ti, 0.94 for ViT-B, 0.95 for ViT-L and 0.955 for ViT-S on Cityscapes).
- Global merging, in a later block (ALGM's "layer 5", our `global_block` 4; 7, ours 6, for
  ViT-L): ToMe's bipartite matching. The tokens are split by alternate positions into sets A
  and B, each A token finds its most similar B token (cosine similarity), and the A tokens
  whose best similarity reaches an adaptive threshold, the mean of those best similarities plus
  their standard deviation divided by the block's (1-based) number, are averaged into their B
  token.

Similarities are taken on the tokens themselves (the residual stream after the attention), as
ALGM does. The prefix tokens (class, registers) never merge. Every merged token carries its
size, the number of grid patches it stands for; averages are weighted by size, and with
`prop_attn` (ToMe's proportional attention) the attention logits get log(size) of each key
added, through the additive `attn_mask` of the fused `F.scaled_dot_product_attention` that
timm's blocks call: a token standing for n patches weighs in attention as its n copies would.
(ALGM's released attention receives the sizes but leaves them unused; this follows ToMe.)

What a merged token stands for is kept as `MergeState.assign`, for each grid patch the index of
the token that holds it, instead of ALGM's dense source matrix (patches x patches, 16M entries
per image at 4096 patches). Unmerging copies each token back to all its patches (a gather).

Where the grid comes back (`restore`):
- "mask_head" (default, as ALGM does for Segmenter, whose mask decoder runs on the merged tokens
  and whose masks are unmerged at the end): the queries join the merged tokens and the query
  blocks run on them too; each prediction unmerges the patch tokens to the grid for the mask
  head (its upscaling convolutions need the grid). The masks therefore have the size they have
  without merging, and all blocks but the first gain. Masked attention (training, or
  `masked_attn` "always") still works: a query may attend a merged token when the predicted
  mask logit, resized to the grid as EoMT does, averaged over the token's patches is positive.
- "query_blocks": the grid comes back before the query blocks, which then run exactly as
  without merging (only the encoder blocks gain).

Batching: each image merges by its own thresholds, so images of a batch keep different
numbers of tokens. The batch is padded to its largest count with tokens of size 0; their
log(0) = -inf attention bias hides them as keys (proportional attention or not), they never
merge, and unmerging never reads them, so a batched forward equals the per-image ones.
`batch_count` "min" instead takes ALGM's own rule: one count for the batch, the smallest of
the images' counts (global merging's threshold then also pools the batch's statistics), with
no padding; an image's merging then depends on the other images of its batch.

Limits: timm's plain `Block` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2) and
no rotary position embedding (EVA-02, DINOv3 rotate tokens by their grid position, which a
merged token no longer has). The token counts depend on the image, so the graph's shapes do:
torch.compile (FastForward, solver.compile) and the ONNX export are refused with an error; a
torch.compile of the model by other means runs the merging forward eagerly.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RESTORE_MODES = ("mask_head", "query_blocks")
BATCH_COUNTS = ("own", "min")
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclass
class MergeState:
    """What the merged patch tokens stand for.

    assign: (B, P) int64, for each of the P grid patches (raster order) the index of the token
        holding it. sizes: (B, n) float, the patches each token holds; 0 marks a padding slot.
        The real tokens of an image are always its first slots.
    """

    assign: torch.Tensor
    sizes: torch.Tensor

    @classmethod
    def identity(cls, batch: int, num_patches: int, device, dtype=torch.float32) -> "MergeState":
        assign = torch.arange(num_patches, device=device).expand(batch, -1)
        return cls(assign, torch.ones(batch, num_patches, device=device, dtype=dtype))

    @property
    def counts(self) -> torch.Tensor:
        """(B,) how many real tokens each image has."""
        return (self.sizes > 0).sum(1)


def merge_tokens(
    x: torch.Tensor, sizes: torch.Tensor, mapping: torch.Tensor, num_new: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted averages of tokens that map to the same new slot.

    x (B, n, D), sizes (B, n), mapping (B, n) with values in [0, num_new], where num_new drops
    the token (padding) -> (B, num_new, D) and the new sizes (B, num_new); a slot that nothing
    maps to is padding (zeros, size 0). Differentiable in x.
    """
    batch, _, dim = x.shape
    new_sizes = sizes.new_zeros(batch, num_new + 1).scatter_add(1, mapping, sizes)
    # Sums in float32 at least: a token may gather thousands of patches.
    sums = x.new_zeros(batch, num_new + 1, dim, dtype=torch.promote_types(x.dtype, torch.float32))
    sums = sums.scatter_add(1, mapping[..., None].expand(-1, -1, dim), x * sizes[..., None])
    new_sizes = new_sizes[:, :num_new]
    averages = sums[:, :num_new] / new_sizes.clamp(min=1)[..., None]
    return averages.to(x.dtype), new_sizes


def unmerge(x: torch.Tensor, state: MergeState) -> torch.Tensor:
    """Merged patch tokens (B, n, D) -> the grid's (B, P, D): each token copied to its patches."""
    return x.gather(1, state.assign[..., None].expand(-1, -1, x.shape[-1]))


def pool_to_tokens(values: torch.Tensor, state: MergeState) -> torch.Tensor:
    """Per-patch values (B, C, P) -> their mean over each token's patches (B, C, n)."""
    batch, channels, _ = values.shape
    index = state.assign[:, None, :].expand(batch, channels, -1)
    sums = values.new_zeros(batch, channels, state.sizes.shape[1]).scatter_add(2, index, values)
    return sums / state.sizes.clamp(min=1)[:, None, :].to(values.dtype)


def _rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """(B, n) -> each entry's rank (0 = largest) within its row."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks


def _select(scores: torch.Tensor, chosen: torch.Tensor, batch_count: str) -> torch.Tensor:
    """`chosen` (B, n): each image's own choice, or with "min" the top-r of every image by
    `scores`, r the smallest number chosen in the batch (ALGM's rule)."""
    if batch_count == "own":
        return chosen
    shared = chosen.sum(1).min()
    return _rank_descending(scores) < shared


def window_similarity(patches: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Mean pairwise cosine similarity (self pairs left out) of the tokens of each whole
    `window` x `window` window of the grid: (B, P, D) -> (B, grid_h // window, grid_w // window).

    With unit vectors u_i, sum over pairs i != j of u_i . u_j = |sum u_i|^2 - n: no pair list.
    """
    batch, _, dim = patches.shape
    height, width = grid[0] // window, grid[1] // window
    units = F.normalize(patches.float(), dim=-1).reshape(batch, *grid, dim)
    units = units[:, : height * window, : width * window]
    sums = units.reshape(batch, height, window, width, window, dim).sum((2, 4))
    n = window * window
    return (sums.pow(2).sum(-1) - n) / (n * (n - 1))


def local_merge(
    patches: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    threshold: float,
    batch_count: str = "own",
) -> tuple[torch.Tensor, MergeState]:
    """ALGM's local merging of grid-ordered patch tokens (B, P, D): every window similar enough
    becomes one token (the mean), at the place of the window's first patch; -> merged tokens
    (B, n, D), padded to the batch's largest count, and their MergeState."""
    batch, num_patches, _ = patches.shape
    device = patches.device
    if grid[0] < window or grid[1] < window:
        return patches, MergeState.identity(batch, num_patches, device)
    with torch.no_grad():
        similarity = window_similarity(patches.detach(), grid, window).flatten(1)
        merged_windows = _select(similarity, similarity >= threshold, batch_count)
        # Each patch's window (-1: in no whole window), and each window's first patch.
        rows = torch.arange(grid[0], device=device)[:, None]
        cols = torch.arange(grid[1], device=device)[None, :]
        windows_wide = grid[1] // window
        inside = (rows < grid[0] // window * window) & (cols < windows_wide * window)
        window_of = torch.where(inside, rows // window * windows_wide + cols // window, -1)
        window_of = window_of.flatten()
        first_of_window = (rows // window * window * grid[1] + cols // window * window).flatten()
        positions = torch.arange(num_patches, device=device)
        in_merged = merged_windows[:, window_of.clamp(min=0)] & (window_of >= 0)
        representative = torch.where(in_merged, first_of_window, positions)
        kept = representative == positions
        slots = kept.long().cumsum(1) - 1
        assign = slots.gather(1, representative)
        num_new = int(kept.sum(1).max())
    ones = patches.new_ones(batch, num_patches, dtype=torch.float32)
    merged, sizes = merge_tokens(patches, ones, assign, num_new)
    return merged, MergeState(assign, sizes)


def global_merge(
    patches: torch.Tensor, state: MergeState, layer: int, batch_count: str = "own"
) -> tuple[torch.Tensor, MergeState]:
    """ALGM's global merging (ToMe's bipartite matching with ALGM's adaptive threshold) of the
    merged patch tokens (B, n, D) of `state`, in the 1-based block `layer` -> tokens and state.

    A: the even slots, B: the odd ones. Each A token's best cosine similarity to a B token
    counts; those at least mean + std / layer (over the image's A tokens; with "min" the
    batch's means of both, and its smallest count) merge into their B token.
    """
    batch, num_tokens, _ = patches.shape
    if num_tokens < 2:
        return patches, state
    device = patches.device
    with torch.no_grad():
        real = state.sizes > 0
        units = F.normalize(patches.detach().float(), dim=-1)
        scores = units[:, 0::2] @ units[:, 1::2].transpose(1, 2)
        scores = scores.masked_fill(~real[:, None, 1::2], -torch.inf)
        best, partner = scores.max(-1)
        candidate = real[:, 0::2] & torch.isfinite(best)
        count = candidate.sum(1)
        values = torch.where(candidate, best, 0.0)
        mean = values.sum(1) / count.clamp(min=1)
        var = torch.where(candidate, best - mean[:, None], 0.0).pow(2).sum(1) / (count - 1).clamp(
            min=1
        )
        std = var.sqrt()
        if batch_count == "min":
            mean, std = mean.mean().expand(batch), std.mean().expand(batch)
        threshold = torch.where(count > 1, mean + std / layer, torch.inf)
        chosen = candidate & (best >= threshold[:, None])
        merging = _select(best.masked_fill(~candidate, -torch.inf), chosen, batch_count)
        merging = merging & candidate
        # New slots: the tokens that stay, in their order; a merging A token goes to its B's.
        slot_ids = torch.arange(num_tokens, device=device).expand(batch, -1)
        target = slot_ids.clone()
        target[:, 0::2] = torch.where(merging, 2 * partner + 1, slot_ids[:, 0::2])
        merged_away = torch.zeros_like(real)
        merged_away[:, 0::2] = merging
        kept = real & ~merged_away
        num_new = int(kept.sum(1).max())
        slots = kept.long().cumsum(1) - 1
        mapping = torch.where(real, slots.gather(1, target), num_new)
        assign = mapping.gather(1, state.assign)
    merged, sizes = merge_tokens(patches, state.sizes, mapping, num_new)
    return merged, MergeState(assign, sizes)


def attention_bias(
    state: MergeState, num_leading: int, prop_attn: bool, dtype=torch.float32
) -> torch.Tensor:
    """The additive attention mask (B, 1, 1, num_leading + n) of tokens [leading, merged
    patches]: 0 for the leading ones (queries, prefix), log(size) of each merged token with
    `prop_attn` (else 0), and -inf for padding slots either way."""
    sizes = state.sizes
    patch_bias = sizes.log() if prop_attn else torch.where(sizes > 0, 0.0, -torch.inf)
    leading = sizes.new_zeros(sizes.shape[0], num_leading)
    return torch.cat((leading, patch_bias), 1)[:, None, None].to(dtype)


def _attention_half(block: nn.Module, x: torch.Tensor, bias) -> torch.Tensor:
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=bias)))


def _mlp_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class TokenMerging(nn.Module):
    """ALGM on an EoMT (see the module's docstring); no parameters, so checkpoints load with
    it on or off. `local_block` / `global_block`: 0-based blocks whose attention the merge
    follows (-1: no such merge); global merging's threshold divides by `global_block + 1`,
    ALGM's layer number. `last_state` keeps the last forward's MergeState (for pictures), and
    `last_counts` (block, tokens per image) after each of its merges."""

    def __init__(
        self,
        window: int = 2,
        threshold: float = 0.88,
        local_block: int = 0,
        global_block: int = 4,
        prop_attn: bool = True,
        restore: str = "mask_head",
        batch_count: str = "own",
    ):
        super().__init__()
        if window < 2:
            raise ValueError(f"token merging window must be at least 2, got {window}")
        if restore not in RESTORE_MODES:
            raise ValueError(f"token merging restore must be one of {RESTORE_MODES}: {restore!r}")
        if batch_count not in BATCH_COUNTS:
            raise ValueError(
                f"token merging batch_count must be one of {BATCH_COUNTS}: {batch_count!r}"
            )
        if local_block < -1 or global_block < -1:
            raise ValueError("token merging blocks must be >= 0, or -1 for none")
        if local_block >= 0 and global_block >= 0 and global_block <= local_block:
            raise ValueError(
                f"global merging (block {global_block}) must come after local merging "
                f"(block {local_block})"
            )
        self.window, self.threshold = window, threshold
        self.local_block, self.global_block = local_block, global_block
        self.prop_attn, self.restore, self.batch_count = prop_attn, restore, batch_count
        self.last_state: MergeState | None = None
        self.last_counts: list[tuple[int, torch.Tensor]] = []

    def extra_repr(self) -> str:
        return (
            f"window={self.window}, threshold={self.threshold}, local_block={self.local_block}, "
            f"global_block={self.global_block}, prop_attn={self.prop_attn}, "
            f"restore={self.restore}, batch_count={self.batch_count}"
        )

    def check(self, model: nn.Module) -> None:
        """Refuse, with the reason, an EoMT this merging cannot run on."""
        backbone = model.backbone
        num_encoder = len(model.encoder_blocks)
        for name, block in (("local_block", self.local_block), ("global_block", self.global_block)):
            if block >= num_encoder:
                raise ValueError(
                    f"token merging {name}={block} must be one of the blocks before the query "
                    f"blocks (0..{num_encoder - 1}), or -1"
                )
        if getattr(backbone, "rope", None) is not None or any(
            hasattr(block.attn, "rope") or "rope" in type(block.attn).__name__.lower()
            for block in backbone.blocks
        ):
            raise ValueError(
                "token merging needs a ViT without rotary position embeddings (EVA-02, DINOv3 "
                "rotate tokens by grid position, which merged tokens no longer have)"
            )
        for index in (self.local_block, self.global_block):
            if index >= 0 and not all(hasattr(backbone.blocks[index], p) for p in BLOCK_PARTS):
                raise ValueError(
                    f"token merging splits block {index} between attention and MLP: it needs "
                    f"timm's plain Block ({', '.join(BLOCK_PARTS)}), got "
                    f"{type(backbone.blocks[index]).__name__}"
                )

    @torch.compiler.disable
    def forward(self, model: nn.Module, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """EoMT's forward from the embedded tokens [prefix, patches] `x` on: the encoder
        blocks with merging, then the query blocks and the predictions (see `restore`)."""
        if torch.onnx.is_in_onnx_export():
            raise RuntimeError(
                "token merging gives each image its own number of tokens: the ONNX graph "
                "cannot hold that; export with model.token_merging.enabled=false"
            )
        backbone = model.backbone
        prefix = backbone.num_prefix_tokens
        grid = tuple(backbone.patch_embed.grid_size)
        state = MergeState.identity(x.shape[0], grid[0] * grid[1], x.device)
        self.last_counts = []
        bias = None  # no merge yet: every size 1, no padding
        for index, block in enumerate(model.encoder_blocks):
            if index not in (self.local_block, self.global_block):
                x = block(x, attn_mask=bias)
                continue
            x = _attention_half(block, x, bias)
            patches = x[:, prefix:]
            if index == self.local_block:
                patches, state = local_merge(
                    patches, grid, self.window, self.threshold, self.batch_count
                )
            else:
                patches, state = global_merge(patches, state, index + 1, self.batch_count)
            x = torch.cat((x[:, :prefix], patches), 1)
            bias = attention_bias(state, prefix, self.prop_attn, x.dtype)
            self.last_counts.append((index, state.counts))
            x = _mlp_half(block, x)
        self.last_state = state
        if self.restore == "query_blocks":
            x = torch.cat((x[:, :prefix], unmerge(x[:, prefix:], state)), 1)
            return model.decode(x, backbone.norm)
        return self.decode(model, x, state)

    def decode(self, model: nn.Module, x: torch.Tensor, state: MergeState) -> list[dict]:
        """`MaskTransformer.decode` on merged tokens: the query blocks attend with the sizes'
        bias (and, while masked attention is active, within the masks pooled to the tokens);
        every prediction reads the grid, unmerged."""
        norm = model.backbone.norm
        x = torch.cat((model.queries.weight.expand(x.shape[0], -1, -1), x), dim=1)
        leading = model.num_queries + model.backbone.num_prefix_tokens
        bias = attention_bias(state, leading, self.prop_attn, x.dtype)
        masked = model.masked_attn_active
        predictions = []
        for block, prob in zip(model.query_blocks, model.attn_mask_probs):
            attn_mask = bias
            if masked:
                prediction = self.predict(model, norm(x), state)
                predictions.append(prediction)
                attn_mask = self.masked_bias(model, prediction["mask_logits"], prob, state, bias)
            x = block(x, attn_mask=attn_mask)
        predictions.append(self.predict(model, norm(x), state))
        return predictions

    @staticmethod
    def predict(model: nn.Module, x: torch.Tensor, state: MergeState) -> dict:
        """Normalised tokens [queries, prefix, merged patches] -> the model's prediction, from
        the patches unmerged to the grid."""
        leading = model.num_queries + model.backbone.num_prefix_tokens
        return model.predict(torch.cat((x[:, :leading], unmerge(x[:, leading:], state)), 1))

    @staticmethod
    def masked_bias(
        model: nn.Module, mask_logits: torch.Tensor, prob, state: MergeState, bias: torch.Tensor
    ) -> torch.Tensor:
        """`MaskTransformer.attention_mask` for merged tokens, as an additive mask (B, 1, N, N):
        a query may attend a merged token when its mask logit, resized to the grid, averaged
        over the token's patches is positive; -inf where it may not, else `bias`."""
        batch, num_queries = mask_logits.shape[:2]
        grid = model.backbone.patch_embed.grid_size
        logits = F.interpolate(mask_logits, grid, mode="bilinear").flatten(2)
        may_attend = pool_to_tokens(logits, state) > 0
        dropped = torch.rand(batch, num_queries, device=mask_logits.device) >= prob
        may_attend = may_attend | dropped[:, :, None]
        leading = num_queries + model.backbone.num_prefix_tokens
        num_tokens = leading + state.sizes.shape[1]
        allowed = torch.ones(
            batch, num_tokens, num_tokens, dtype=torch.bool, device=mask_logits.device
        )
        allowed[:, :num_queries, leading:] = may_attend
        full = bias.expand(batch, 1, num_tokens, num_tokens)
        return full.masked_fill(~allowed[:, None], -torch.inf)
