"""Multi-scale deformable attention (Deformable DETR, Zhu et al., ICLR 2021).

Every query looks at a few points per head and feature level: offsets predicted from the query
move them away from its reference point, the values there are read with bilinear interpolation
(zero outside the map) and summed with softmax weights, also predicted from the query.

The sampling core has two implementations with the same convention as the official CUDA kernel
(location x in [0, 1] reads pixel coordinate x * width - 0.5): a pure PyTorch one on
`F.grid_sample` that runs everywhere, and Triton kernels for forward and backward
(`ms_deform_attn_triton.py`) used on CUDA tensors when triton is installed.
`EOMT_MSDA_BACKEND=pytorch` (or the `backend` argument) forces the pure path.
"""

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

# triton is optional: without it every device takes the PyTorch path.
if importlib.util.find_spec("triton") is not None:
    from eomt.modeling.ms_deform_attn_triton import ms_deform_attn_triton
else:
    ms_deform_attn_triton = None

BACKENDS = ("auto", "pytorch", "triton")


def promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the sampling computes and returns: bf16 values with float32 locations (as
    under autocast) give float32, so that locations keep their precision."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def ms_deform_attn_core_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention sampling with `F.grid_sample`; see `ms_deform_attn_core`."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist()
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(
            f"spatial_shapes {shapes} cover {sum(h * w for h, w in shapes)} positions, "
            f"but value has {value.shape[1]}"
        )
    dtype = promoted_dtype(value, sampling_locations, attention_weights)
    value, attention_weights = value.to(dtype), attention_weights.to(dtype)
    # grid_sample's [-1, 1] grid with align_corners=False reads pixel x * width - 0.5.
    grids = 2 * sampling_locations.to(dtype) - 1
    sampled = []
    levels = zip(shapes, level_start_index.tolist())
    for level, ((height, width), start) in enumerate(levels):
        # (B, h*w, heads, D) -> (B*heads, D, h, w)
        value_level = (
            value[:, start : start + height * width]
            .permute(0, 2, 3, 1)
            .reshape(batch * num_heads, head_dim, height, width)
        )
        # (B, Q, heads, P, 2) -> (B*heads, Q, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                value_level, grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # (B*heads, D, Q, L*P) weighted by (B*heads, 1, Q, L*P)
    sampled = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels * num_points
    )
    output = (sampled * weights).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2)


def resolve_backend(value: torch.Tensor, backend: str | None = None) -> str:
    """'pytorch' or 'triton' for this input. `backend` (else the EOMT_MSDA_BACKEND environment
    variable, else 'auto') picks one; 'auto' takes Triton for CUDA tensors when it imports."""
    if backend is None:
        backend = os.environ.get("EOMT_MSDA_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"deformable attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if ms_deform_attn_triton is None:
            raise RuntimeError("deformable attention backend 'triton' needs triton installed")
        if not value.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "deformable attention backend 'triton' needs CUDA tensors "
                "(or the Triton interpreter, TRITON_INTERPRET=1)"
            )
    if backend == "auto":
        return "triton" if ms_deform_attn_triton is not None and value.is_cuda else "pytorch"
    return backend


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Sample and sum the values of every query.

    Args:
        value: (B, S, heads, D) values of all levels, flattened and concatenated.
        spatial_shapes: (L, 2) long, (height, width) of each level.
        level_start_index: (L,) long, where each level starts in S.
        sampling_locations: (B, Q, heads, L, P, 2) normalised (x, y); (0, 0) is the top-left
            corner of the map and (1, 1) the bottom-right one.
        attention_weights: (B, Q, heads, L, P).
        backend: 'auto', 'pytorch' or 'triton'; None reads EOMT_MSDA_BACKEND (default 'auto').

    Returns:
        (B, Q, heads * D) in the promoted dtype of value, locations and weights (the Triton
        kernels read any float dtype and sum in float32).
    """
    if resolve_backend(value, backend) == "triton":
        return ms_deform_attn_triton(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_core_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the official parameter names and initialisation.

    Args:
        d_model: width of the queries and the input features.
        n_levels: number of feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
        ratio: the values (and the sampled output) have int(d_model * ratio) channels
            (ViT-Adapter's deform_ratio); `output_proj` maps them back to d_model.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        ratio: float = 1.0,
    ):
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(
                f"int(d_model * ratio) = {value_dim} must be divisible by n_heads = {n_heads}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.ratio = ratio
        self.value_dim = value_dim
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        """Offsets start as fixed rays: head h points at angle 2*pi*h/heads, point p lies p + 1
        pixels out (on the square around the reference); the weights start uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        grid = directions[:, None, None, :] * steps[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, d_model).
            reference_points: (B, Q, n_levels, 2) normalised (x, y) per level.
            input_flatten: (B, S, d_model) features of all levels, flattened and concatenated.
            input_spatial_shapes: (n_levels, 2) long, (height, width) per level.
            input_level_start_index: (n_levels,) long, where each level starts in S.
            input_padding_mask: (B, S) bool, True at padding (read as zero), or None.

        Returns:
            (B, Q, d_model).
        """
        batch, num_queries, _ = query.shape
        num_inputs = input_flatten.shape[1]
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(
                f"input_spatial_shapes must be ({self.n_levels}, 2), "
                f"got {tuple(input_spatial_shapes.shape)}"
            )
        if reference_points.shape[-2:] != (self.n_levels, 2):
            raise ValueError(
                f"reference_points must end with ({self.n_levels}, 2), "
                f"got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_inputs, self.n_heads, self.value_dim // self.n_heads)

        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points
        )
        # Offsets are in pixels of each level: divide by (width, height) to normalise.
        normaliser = input_spatial_shapes.flip(-1).to(offsets.dtype)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / normaliser[None, None, None, :, None]
        )
        output = ms_deform_attn_core(
            value, input_spatial_shapes, input_level_start_index, locations, weights
        )
        return self.output_proj(output)
