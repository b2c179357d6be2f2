"""VidEoMT: EoMT made an online video segmenter (Norouzi et al., CVPR 2026).

The same plain ViT runs frame by frame. The first frame's query blocks take EoMT's learned
queries; every later frame takes the previous frame's output queries passed through one linear
layer (the query updater) and added to the learned queries (the fusion), so that query k keeps
following the object it found: identities come out of the model, with no tracker.

    frame t -> tokens -> L1 blocks -> [queries(t), tokens] -> L2 blocks -> head -> prediction(t)
    queries(0) = q;  queries(t) = updater(out_queries(t-1)) + q

There is no masked attention (the authors' model passes no mask). In training each frame is
also predicted before each query block (deep supervision); those predictions read the raw
tokens, or the normalised ones with `norm_queries`, which also normalises the queries that are
propagated. State between frames is the (B, K, D) queries only, so memory is constant over a
video.
"""

import torch
from torch import nn

from eomt.modeling.eomt import EoMT


class VidEoMT(EoMT):
    """VidEoMT on a timm ViT; the arguments are EoMT's (without masked attention) and:

    norm_queries: read the intermediate predictions and the propagated queries from the
        tokens after the ViT's final norm (the authors' NORM_QUERIES, off by default).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_queries: int = 200,
        num_query_blocks: int = 4,
        norm_queries: bool = False,
    ):
        super().__init__(backbone, num_classes, num_queries, num_query_blocks, masked_attn="never")
        self.norm_queries = norm_queries
        self.query_updater = nn.Linear(backbone.embed_dim, backbone.embed_dim)

    def initial_queries(self, batch: int) -> torch.Tensor:
        return self.queries.weight.expand(batch, -1, -1)

    def segment_frame(
        self, x: torch.Tensor, queries: torch.Tensor, block_kwargs: dict
    ) -> tuple[list[dict], torch.Tensor]:
        """One frame's encoded tokens and its input queries -> its predictions (in training one
        before each query block, then the final one; else the final one) and the queries of
        the next frame."""
        x = torch.cat((queries, x), dim=1)
        predictions = []
        for block in self.query_blocks:
            if self.training:
                predictions.append(self.predict(self.backbone.norm(x) if self.norm_queries else x))
            x = block(x, **block_kwargs)
        normed = self.backbone.norm(x)
        predictions.append(self.predict(normed))
        out_queries = (normed if self.norm_queries else x)[:, : self.num_queries]
        return predictions, self.query_updater(out_queries) + self.queries.weight

    def step(
        self, frames: torch.Tensor, queries: torch.Tensor | None = None
    ) -> tuple[dict, torch.Tensor]:
        """Streaming inference: frames (B, 3, H, W) in [0, 1], one per video, and the queries
        the previous call returned (None at a video's first frame) -> (the frame's prediction,
        the queries for the next call)."""
        x, block_kwargs = self.encode(frames)
        if queries is None:
            queries = self.initial_queries(frames.shape[0])
        predictions, queries = self.segment_frame(x, queries, block_kwargs)
        return predictions[-1], queries

    def forward(self, clips: torch.Tensor) -> list:
        """Clips (B, T, 3, H, W) in [0, 1] -> per frame, in order, computed online (frame t sees
        frames up to t only).

        At inference: a list of T dicts, the frame's `mask_logits` (B, K, H/4, W/4) and
        `class_logits` (B, K, C+1), as EoMT gives for an image. In training: a list over the
        supervised depths (one before each query block, then the final one) of dicts holding
        `mask_logits` (B, T, K, H/4, W/4) and `class_logits` (B, T, K, C+1).
        """
        batch, num_frames = clips.shape[:2]
        # The blocks before the query blocks see no query: all frames at once.
        x, block_kwargs = self.encode(clips.flatten(0, 1))
        x = x.unflatten(0, (batch, num_frames))
        queries = self.initial_queries(batch)
        per_frame = []
        for t in range(num_frames):
            predictions, queries = self.segment_frame(x[:, t], queries, block_kwargs)
            per_frame.append(predictions)
        if not self.training:
            return [predictions[-1] for predictions in per_frame]
        return [
            {key: torch.stack([frame[depth][key] for frame in per_frame], 1) for key in frame0}
            for depth, frame0 in enumerate(per_frame[0])
        ]
