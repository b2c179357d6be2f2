import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eomt.modeling.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_core,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_triton,
    resolve_backend,
)

needs_triton = pytest.mark.skipif(ms_deform_attn_triton is None, reason="triton is not installed")

SHAPES = [(3, 4), (2, 3)]


def level_inputs(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat((areas.new_zeros(1), areas.cumsum(0)[:-1]))
    return spatial_shapes, level_start_index


def random_inputs(shapes, batch=2, queries=3, heads=2, head_dim=3, points=2, seed=0, dtype=None):
    """Random value, locations (some outside the map) and positive weights."""
    generator = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float64
    spatial_shapes, level_start_index = level_inputs(shapes)
    num_values = int(spatial_shapes.prod(1).sum())
    levels = len(shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator)
    locations = (locations * 1.4 - 0.2).to(dtype)
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def explicit_reference(value, spatial_shapes, level_start_index, locations, weights):
    """Loops with the official CUDA kernel's rule: location (x, y) reads pixel coordinates
    (x * w - 0.5, y * h - 0.5) bilinearly from its four neighbours, zero outside the map."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    output = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl in range(levels):
                    height, width = spatial_shapes[lvl].tolist()
                    start = int(level_start_index[lvl])
                    for p in range(points):
                        col = float(locations[b, q, m, lvl, p, 0]) * width - 0.5
                        row = float(locations[b, q, m, lvl, p, 1]) * height - 0.5
                        row0, col0 = math.floor(row), math.floor(col)
                        sample = torch.zeros(head_dim, dtype=value.dtype)
                        for r, c in (
                            (row0, col0),
                            (row0, col0 + 1),
                            (row0 + 1, col0),
                            (row0 + 1, col0 + 1),
                        ):
                            if 0 <= r < height and 0 <= c < width:
                                bilinear = (1 - abs(row - r)) * (1 - abs(col - c))
                                sample += bilinear * value[b, start + r * width + c, m]
                        output[b, q, m] += weights[b, q, m, lvl, p] * sample
    return output.flatten(2)


def test_pytorch_core_matches_explicit_reference():
    inputs = random_inputs(SHAPES)
    expected = explicit_reference(*inputs)
    torch.testing.assert_close(ms_deform_attn_core_pytorch(*inputs), expected)


def test_pytorch_core_far_outside_reads_zero():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(SHAPES)
    locations = torch.full_like(locations, -0.6)
    output = ms_deform_attn_core_pytorch(
        value, spatial_shapes, level_start_index, locations, weights
    )
    assert torch.equal(output, torch.zeros_like(output))


def test_pytorch_core_samples_bf16_values_at_float32_locations():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        SHAPES, dtype=torch.float32
    )
    value = value.to(torch.bfloat16)
    args = (spatial_shapes, level_start_index, locations, weights)
    output = ms_deform_attn_core_pytorch(value, *args)
    assert output.dtype == torch.float32  # the locations are not rounded to bf16
    torch.testing.assert_close(output, ms_deform_attn_core_pytorch(value.float(), *args))


def test_pytorch_core_gradcheck():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        [(2, 3), (1, 2)], batch=1, queries=2, heads=2, head_dim=2, points=2, seed=1
    )
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)

    def core(value, locations, weights):
        return ms_deform_attn_core_pytorch(
            value, spatial_shapes, level_start_index, locations, weights
        )

    assert torch.autograd.gradcheck(core, (value, locations, weights))


def test_pytorch_core_rejects_shapes_that_do_not_cover_value():
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(SHAPES)
    with pytest.raises(ValueError, match="cover 20 positions, but value has 18"):
        ms_deform_attn_core_pytorch(
            value, torch.tensor([(3, 4), (2, 4)]), level_start_index, locations, weights
        )


def test_backend_choice(monkeypatch):
    cpu_value = torch.zeros(1)
    monkeypatch.delenv("EOMT_MSDA_BACKEND", raising=False)
    assert resolve_backend(cpu_value) == "pytorch"  # auto on CPU
    monkeypatch.setenv("EOMT_MSDA_BACKEND", "pytorch")
    assert resolve_backend(cpu_value) == "pytorch"
    assert resolve_backend(cpu_value, backend="auto") == "pytorch"
    monkeypatch.setenv("EOMT_MSDA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(cpu_value)
    if ms_deform_attn_triton is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="'triton' needs CUDA tensors"):
            resolve_backend(cpu_value, backend="triton")
    inputs = random_inputs(SHAPES)
    torch.testing.assert_close(
        ms_deform_attn_core(*inputs, backend="pytorch"), ms_deform_attn_core_pytorch(*inputs)
    )


def test_initial_sampling_offsets_are_rays_per_head():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Head h points at angle 2*pi*h/4: right, down, left, up; point p is p + 1 pixels out.
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for level in range(2):
        for point in range(3):
            torch.testing.assert_close(bias[:, level, point], directions * (point + 1))
    eight = MSDeformAttn(d_model=16, n_levels=1, n_heads=8, n_points=1)
    # The diagonal head (45 degrees) is scaled onto the square: (1, 1), not (0.71, 0.71).
    torch.testing.assert_close(eight.sampling_offsets.bias.view(8, 2)[1], torch.tensor([1.0, 1.0]))
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()


def test_module_output_shape_and_value_width():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3, ratio=0.5)
    assert attn.value_proj.out_features == 16 and attn.output_proj.in_features == 16
    spatial_shapes, level_start_index = level_inputs(SHAPES)
    query = torch.randn(2, 5, 32)
    reference_points = torch.rand(2, 5, 2, 2)
    features = torch.randn(2, 18, 32)
    output = attn(query, reference_points, features, spatial_shapes, level_start_index)
    assert output.shape == (2, 5, 32)
    with pytest.raises(ValueError, match="input_spatial_shapes must be"):
        attn(query, reference_points, features, spatial_shapes[:1], level_start_index[:1])
    with pytest.raises(ValueError, match="must be divisible by n_heads"):
        MSDeformAttn(d_model=32, n_heads=6)


def identity_attention(d_model, n_levels, n_heads, n_points):
    """MSDeformAttn with identity projections and zero offsets: it averages the features at the
    reference points (the attention weights start uniform)."""
    attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()
        for linear in (attn.value_proj, attn.output_proj):
            linear.weight.copy_(torch.eye(d_model))
    return attn


def test_reference_points_at_pixel_centres_read_the_pixels():
    attn = identity_attention(d_model=4, n_levels=2, n_heads=2, n_points=3)
    spatial_shapes, level_start_index = level_inputs(SHAPES)
    features = torch.randn(1, 18, 4)
    # Query 0 reads pixel (row 2, col 1) of level 0 and (row 0, col 2) of level 1; query 1 the
    # corners (0, 0) and (1, 2). Pixel centres: ((col + 0.5) / width, (row + 0.5) / height).
    reference_points = torch.tensor(
        [[[[1.5 / 4, 2.5 / 3], [2.5 / 3, 0.5 / 2]], [[0.5 / 4, 0.5 / 3], [2.5 / 3, 1.5 / 2]]]]
    )
    output = attn(
        torch.randn(1, 2, 4), reference_points, features, spatial_shapes, level_start_index
    )
    level1 = 12
    expected = torch.stack(
        [
            (features[0, 2 * 4 + 1] + features[0, level1 + 0 * 3 + 2]) / 2,
            (features[0, 0] + features[0, level1 + 1 * 3 + 2]) / 2,
        ]
    )
    torch.testing.assert_close(output[0], expected)


def test_padding_mask_hides_the_padded_values():
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    spatial_shapes, level_start_index = level_inputs(SHAPES)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 8, generator=generator)
    reference_points = torch.rand(1, 4, 2, 2, generator=generator)
    reference_points[:, :, 0, 1] = 0.8  # near the last row of level 0
    features = torch.randn(1, 18, 8, generator=generator)
    padding = torch.zeros(1, 18, dtype=torch.bool)
    padding[0, 8:12] = True  # the last row of level 0
    changed = features.clone()
    changed[0, 8:12] = 100.0
    args = (spatial_shapes, level_start_index, padding)
    out = attn(query, reference_points, features, *args)
    torch.testing.assert_close(attn(query, reference_points, changed, *args), out)
    assert not torch.allclose(
        attn(query, reference_points, changed, spatial_shapes, level_start_index), out
    )


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before triton is imported.
TRITON_VS_PYTORCH = textwrap.dedent(
    """
    import os
    import torch
    from eomt.modeling.ms_deform_attn import MSDeformAttn, ms_deform_attn_core
    from tests.test_ms_deform_attn import SHAPES, level_inputs, random_inputs

    # 70 queries: two blocks of 64, the second partly empty; head_dim 3 pads to 4 channels;
    # a third of the locations fall outside the maps.
    inputs = random_inputs(SHAPES, queries=70, heads=2, head_dim=3, points=2, dtype=torch.float32)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    leaves = [t.requires_grad_(True) for t in (value, locations, weights)]
    args = (value, spatial_shapes, level_start_index, locations, weights)
    fast = ms_deform_attn_core(*args, backend="triton")
    slow = ms_deform_attn_core(*args, backend="pytorch")
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(slow)
    fast_grads = torch.autograd.grad(fast, leaves, grad_out)
    slow_grads = torch.autograd.grad(slow, leaves, grad_out)
    for name, a, b in zip(("value", "locations", "weights"), fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)

    # torch.compile sees the kernels as custom ops with fake implementations: no graph break.
    compiled = torch.compile(ms_deform_attn_core, backend="aot_eager", fullgraph=True)
    traced = compiled(*args, backend="triton")
    torch.testing.assert_close(traced, fast)
    traced_grads = torch.autograd.grad(traced, leaves, grad_out)
    for name, a, b in zip(("value", "locations", "weights"), traced_grads, fast_grads):
        torch.testing.assert_close(a, b, msg=name)

    # The module takes the backend from EOMT_MSDA_BACKEND (set to triton by the caller).
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    spatial_shapes, level_start_index = level_inputs(SHAPES)
    query, points, features = torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2), torch.randn(2, 18, 16)
    out = attn(query, points, features, spatial_shapes, level_start_index)
    out.square().sum().backward()
    grad = attn.sampling_offsets.weight.grad.clone()
    attn.zero_grad()
    os.environ["EOMT_MSDA_BACKEND"] = "pytorch"
    reference = attn(query, points, features, spatial_shapes, level_start_index)
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, attn.sampling_offsets.weight.grad, atol=1e-4, rtol=1e-4)
    print("triton matches pytorch")
    """
)


@needs_triton
def test_triton_kernels_match_pytorch_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", EOMT_MSDA_BACKEND="triton")
    result = subprocess.run(
        [sys.executable, "-c", TRITON_VS_PYTORCH],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton matches pytorch" in result.stdout


@needs_triton
def test_triton_kernels_compile_for_h100_without_a_gpu():
    """The interpreter does not check what only the GPU compiler sees (types, layouts): build
    both kernels ahead of time for sm_90, with bf16 values as under autocast."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from eomt.modeling.ms_deform_attn_triton import _backward_kernel, _forward_kernel

    inputs = dict(value_ptr="*bf16", shapes_ptr="*i64", starts_ptr="*i64")
    inputs.update(locations_ptr="*fp32", weights_ptr="*fp32")
    grads = dict.fromkeys(("grad_value_ptr", "grad_locations_ptr", "grad_weights_ptr"), "*fp32")
    sizes = dict.fromkeys(("num_values", "num_queries", "num_heads", "head_dim"), "i32")
    constants = dict(NUM_LEVELS=3, NUM_POINTS=4, BLOCK_Q=64, BLOCK_D=32)
    for kernel, pointers in (
        (_forward_kernel, dict(inputs, out_ptr="*fp32")),
        (_backward_kernel, dict(inputs, grad_out_ptr="*fp32", **grads)),
    ):
        signature = {**pointers, **sizes, **dict.fromkeys(constants, "constexpr")}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
        assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("input_size, batch", [(256, 2), (640, 1)])
def test_triton_kernels_match_pytorch_on_gpu(value_dtype, input_size, batch):
    # The pixel decoder's levels at 1/8, 1/16, 1/32 of the input (640: the paper's 80x80,
    # 40x40 and 20x20 maps), every position a query, its 8 heads of 32 channels and 4 points.
    # bf16 values with float32 locations and weights, as under autocast.
    shapes = [(input_size // s, input_size // s) for s in (8, 16, 32)]
    queries = sum(h * w for h, w in shapes)
    value, spatial_shapes, level_start_index, locations, weights = (
        t.cuda()
        for t in random_inputs(
            shapes,
            batch=batch,
            queries=queries,
            heads=8,
            head_dim=32,
            points=4,
            dtype=torch.float32,
        )
    )
    value = value.to(value_dtype)
    leaves = [t.requires_grad_(True) for t in (value, locations, weights)]
    args = (value, spatial_shapes, level_start_index, locations, weights)
    assert resolve_backend(value, backend="auto") == "triton"
    fast = ms_deform_attn_core(*args, backend="triton")
    slow = ms_deform_attn_core(*args, backend="pytorch")
    assert fast.dtype == slow.dtype == torch.float32
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    grad_out = torch.randn_like(slow)
    fast_grads = torch.autograd.grad(fast, leaves, grad_out)
    slow_grads = torch.autograd.grad(slow, leaves, grad_out)
    assert fast_grads[0].dtype == value_dtype
    tolerance = 1e-3 if value_dtype == torch.float32 else 2e-2
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a.float(), b.float(), atol=tolerance, rtol=tolerance)
