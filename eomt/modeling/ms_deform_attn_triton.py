"""Triton kernels for multi-scale deformable attention sampling, forward and backward.

Same contract and convention as `ms_deform_attn_core_pytorch`: location (x, y) in [0, 1] reads
pixel coordinates (x * width - 0.5, y * height - 0.5) bilinearly, zero outside the map; a point
with x * width - 0.5 <= -1 or >= width (likewise y) contributes nothing, not even a gradient,
as in the official CUDA kernel.

Each program handles BLOCK_Q queries of one head of one image with all channels of the head:
the four neighbours of a point are gathered as (BLOCK_Q, head_dim) tiles of contiguous
channels. Sums are taken in float32 whatever the input dtypes. The backward pass scatters the
value gradient with float32 atomic adds; the location and weight gradients are per query.
Both are registered as torch custom ops (`eomt::ms_deform_attn_forward` / `_backward`), so
torch.compile keeps them as single calls.
"""

import torch
import triton
import triton.language as tl

BLOCK_Q = 64


@triton.jit
def _forward_kernel(
    value_ptr,  # (B, S, heads, D)
    shapes_ptr,  # (L, 2) height, width
    starts_ptr,  # (L,)
    locations_ptr,  # (B, Q, heads, L, P, 2)
    weights_ptr,  # (B, Q, heads, L, P)
    out_ptr,  # (B, Q, heads, D)
    num_values,
    num_queries,
    num_heads,
    head_dim,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(2).to(tl.int64)
    head = tl.program_id(1)
    queries = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    query_ok = queries < num_queries
    channel_ok = channels < head_dim
    row_stride = num_heads * head_dim
    value_base = value_ptr + batch * num_values * row_stride + head * head_dim
    # Index of (batch, query, head) in the (B, Q, heads) prefix of every per-query tensor.
    rows = (batch * num_queries + queries) * num_heads + head

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in range(NUM_POINTS):
            k = rows * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            x = tl.load(locations_ptr + 2 * k, mask=query_ok).to(tl.float32) * width - 0.5
            y = tl.load(locations_ptr + 2 * k + 1, mask=query_ok).to(tl.float32) * height - 0.5
            attn = tl.load(weights_ptr + k, mask=query_ok).to(tl.float32)
            inside = query_ok & (x > -1) & (y > -1) & (x < width) & (y < height)
            x_low = tl.floor(x)
            y_low = tl.floor(y)
            frac_x = x - x_low
            frac_y = y - y_low
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    col = x_low.to(tl.int64) + dx
                    row = y_low.to(tl.int64) + dy
                    # dx = 0: weight 1 - frac_x; dx = 1: frac_x (likewise y).
                    bilinear = (frac_x * dx + (1 - frac_x) * (1 - dx)) * (
                        frac_y * dy + (1 - frac_y) * (1 - dy)
                    )
                    ok = inside & (col >= 0) & (col < width) & (row >= 0) & (row < height)
                    offsets = (start + row * width + col) * row_stride
                    corner = tl.load(
                        value_base + offsets[:, None] + channels[None, :],
                        mask=ok[:, None] & channel_ok[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    acc += (attn * bilinear)[:, None] * corner
    out = out_ptr + rows[:, None] * head_dim + channels[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=query_ok[:, None] & channel_ok[None, :])


@triton.jit
def _backward_kernel(
    value_ptr,  # (B, S, heads, D)
    shapes_ptr,
    starts_ptr,
    locations_ptr,
    weights_ptr,
    grad_out_ptr,  # (B, Q, heads, D)
    grad_value_ptr,  # float32 (B, S, heads, D), zero-initialised, accumulated atomically
    grad_locations_ptr,  # float32 (B, Q, heads, L, P, 2)
    grad_weights_ptr,  # float32 (B, Q, heads, L, P)
    num_values,
    num_queries,
    num_heads,
    head_dim,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(2).to(tl.int64)
    head = tl.program_id(1)
    queries = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channels = tl.arange(0, BLOCK_D)
    query_ok = queries < num_queries
    channel_ok = channels < head_dim
    row_stride = num_heads * head_dim
    batch_offset = batch * num_values * row_stride + head * head_dim
    rows = (batch * num_queries + queries) * num_heads + head
    grad_out = tl.load(
        grad_out_ptr + rows[:, None] * head_dim + channels[None, :],
        mask=query_ok[:, None] & channel_ok[None, :],
        other=0.0,
    ).to(tl.float32)

    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in range(NUM_POINTS):
            k = rows * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            x = tl.load(locations_ptr + 2 * k, mask=query_ok).to(tl.float32) * width - 0.5
            y = tl.load(locations_ptr + 2 * k + 1, mask=query_ok).to(tl.float32) * height - 0.5
            attn = tl.load(weights_ptr + k, mask=query_ok).to(tl.float32)
            inside = query_ok & (x > -1) & (y > -1) & (x < width) & (y < height)
            x_low = tl.floor(x)
            y_low = tl.floor(y)
            frac_x = x - x_low
            frac_y = y - y_low
            grad_attn = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            grad_x = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            grad_y = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    col = x_low.to(tl.int64) + dx
                    row = y_low.to(tl.int64) + dy
                    weight_x = frac_x * dx + (1 - frac_x) * (1 - dx)
                    weight_y = frac_y * dy + (1 - frac_y) * (1 - dy)
                    ok = inside & (col >= 0) & (col < width) & (row >= 0) & (row < height)
                    tile_ok = ok[:, None] & channel_ok[None, :]
                    offsets = (
                        batch_offset + (start + row * width + col)[:, None] * row_stride
                    ) + channels[None, :]
                    corner = tl.load(value_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
                    # d(output)/d(corner) = attn * bilinear, per channel.
                    tl.atomic_add(
                        grad_value_ptr + offsets,
                        (attn * weight_x * weight_y)[:, None] * grad_out,
                        mask=tile_ok,
                    )
                    corner_dot = tl.sum(corner * grad_out, axis=1)
                    grad_attn += weight_x * weight_y * corner_dot
                    # d(weight_x)/dx is +1 for the right neighbour, -1 for the left one.
                    grad_x += (2 * dx - 1) * weight_y * corner_dot
                    grad_y += (2 * dy - 1) * weight_x * corner_dot
            tl.store(grad_weights_ptr + k, grad_attn, mask=query_ok)
            # x = location_x * width - 0.5: the chain rule multiplies by width (height for y).
            tl.store(grad_locations_ptr + 2 * k, attn * grad_x * width, mask=query_ok)
            tl.store(grad_locations_ptr + 2 * k + 1, attn * grad_y * height, mask=query_ok)


def _launch_args(value, sampling_locations):
    batch, num_values, num_heads, head_dim = value.shape
    num_queries, _, num_levels, num_points = sampling_locations.shape[1:5]
    grid = (triton.cdiv(num_queries, BLOCK_Q), num_heads, batch)
    sizes = (num_values, num_queries, num_heads, head_dim)
    constants = dict(
        NUM_LEVELS=num_levels,
        NUM_POINTS=num_points,
        BLOCK_Q=BLOCK_Q,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return grid, sizes, constants


def _output_like(value, sampling_locations, attention_weights):
    # bf16 values with float32 locations (autocast) give a float32 output, as grid_sample does.
    dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    batch, _, num_heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], num_heads * head_dim, dtype=dtype)


# Custom ops: torch.compile treats them as opaque calls (shapes from the fake implementations)
# instead of tracing into the kernel launches.
@torch.library.custom_op("eomt::ms_deform_attn_forward", mutates_args=())
def ms_deform_attn_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    output = _output_like(value, sampling_locations, attention_weights)
    grid, sizes, constants = _launch_args(value, sampling_locations)
    _forward_kernel[grid](
        value,
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations,
        attention_weights,
        output,
        *sizes,
        **constants,
    )
    return output


@ms_deform_attn_forward.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return _output_like(value, sampling_locations, attention_weights)


@torch.library.custom_op("eomt::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of value, sampling locations and attention weights, in their dtypes."""
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    float32 = dict(dtype=torch.float32, device=value.device)
    grad_value = torch.zeros(value.shape, **float32)
    grad_locations = torch.empty(sampling_locations.shape, **float32)
    grad_weights = torch.empty(attention_weights.shape, **float32)
    grid, sizes, constants = _launch_args(value, sampling_locations)
    _backward_kernel[grid](
        value,
        spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations,
        attention_weights,
        grad_output.contiguous(),
        grad_value,
        grad_locations,
        grad_weights,
        *sizes,
        **constants,
    )
    return (
        grad_value.to(value.dtype),
        grad_locations.to(sampling_locations.dtype),
        grad_weights.to(attention_weights.dtype),
    )


@ms_deform_attn_backward.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return (
        torch.empty_like(value),
        torch.empty_like(sampling_locations),
        torch.empty_like(attention_weights),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
        ctx.saved_tensors
    )
    grad_value, grad_locations, grad_weights = ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    return grad_value, None, None, grad_locations, grad_weights


ms_deform_attn_forward.register_autograd(_backward, setup_context=_setup_context)


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention sampling with the Triton kernels; see `ms_deform_attn_core`."""
    return ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
