import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eomt.benchmark import (
    benchmark,
    count_flops,
    count_parameters,
    cpu_profile,
    crops_per_image,
    flop_kind,
)
from eomt.config import get_cfg
from eomt.modeling import build_model
from eomt.report import read_benchmarks

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs/synthetic/eomt_tiny_panoptic.yaml"
# A ViT small enough to count by hand: 32 x 32 input, patch 8 (4 x 4 patches, one ScaleBlock up
# to 1/4), one class token, width 32, 2 heads, 2 blocks of which the last sees 3 queries.
HAND_OVERRIDES = [
    "model.backbone_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
    "input.image_size=[32, 32]",
    "model.num_queries=3",
    "model.num_query_blocks=1",
    "model.num_classes=4",
]


def load_cli():
    spec = importlib.util.spec_from_file_location("benchmark_cli", REPO / "tools/benchmark.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


class Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_handle_counts_both_products():
    # batch 2, 3 heads, 5 queries, 7 keys, key dim 4, value dim 6:
    # q @ k^T = 2*3*5*7*4 = 840 and attn @ v = 2*3*5*7*6 = 1260 multiply-adds.
    q, k, v = torch.rand(2, 3, 5, 4), torch.rand(2, 3, 7, 4), torch.rand(2, 3, 7, 6)
    counted = count_flops(Attention(), (q, k, v))
    assert counted["flops"] == 2100
    assert counted["by_operator"] == {"scaled_dot_product_attention": 2100}
    assert counted["uncounted_ops"] == {}


def vit_block_flops(tokens: int, dim: int) -> int:
    """fvcore count of one pre-norm ViT block (MLP ratio 4): 2 LayerNorms (5 per element),
    qkv, proj, fc1, fc2 (12 N d^2) and the two attention products (2 N^2 d)."""
    return 2 * 5 * tokens * dim + 12 * tokens * dim**2 + 2 * tokens**2 * dim


def head_flops(queries: int, dim: int, classes: int, grid: int) -> int:
    """fvcore count of one prediction: final LayerNorm over all tokens is counted by the caller;
    mask MLP, class head, one ScaleBlock (transposed conv, depthwise 3x3, LayerNorm2d) and the
    query-pixel dot product at 1/4."""
    pixels = (2 * grid) ** 2
    mask_mlp = 3 * queries * dim * dim
    class_head = queries * dim * (classes + 1)
    transposed_conv = grid * grid * dim * dim * 2 * 2
    depthwise = pixels * dim * 3 * 3
    norm2d = 5 * pixels * dim
    # fvcore counts einsum through numpy's einsum_path report, which prints 2x the multiply-adds
    # with 4 significant digits.
    dot_product = math.floor(float(f"{2 * queries * dim * pixels:.3e}") / 2)
    return mask_mlp + class_head + transposed_conv + depthwise + norm2d + dot_product


def test_tiny_eomt_flops_equal_hand_count():
    cfg = get_cfg(TINY_CONFIG, HAND_OVERRIDES)
    model = build_model(cfg, backbone_weights=False).eval()
    dim, grid, queries, classes = 32, 4, 3, 4
    patches = grid * grid
    patch_embed = patches * (3 * 8 * 8) * dim
    final_norm = 5 * (queries + 1 + patches) * dim
    expected = (
        patch_embed
        + vit_block_flops(1 + patches, dim)
        + vit_block_flops(queries + 1 + patches, dim)
        + final_norm
        + head_flops(queries, dim, classes, grid)
    )
    counted = count_flops(model, torch.rand(1, 3, 32, 32))
    assert counted["flops"] == expected
    attention = 2 * (1 + patches) ** 2 * dim + 2 * (queries + 1 + patches) ** 2 * dim
    assert counted["by_operator"]["scaled_dot_product_attention"] == attention
    # Element-wise ops stay uncounted and are reported.
    assert "aten::gelu" in counted["uncounted_ops"]


def test_masked_inference_adds_one_prediction_per_query_block():
    # With masking at inference, each query block first predicts masks (a full head), which are
    # resized to the patch grid (bilinear: 4 FLOPs per output element) into an attention mask.
    overrides = [*HAND_OVERRIDES, "model.num_query_blocks=2"]
    plain = build_model(get_cfg(TINY_CONFIG, overrides), backbone_weights=False).eval()
    masked = build_model(
        get_cfg(TINY_CONFIG, [*overrides, "model.masked_attn=always"]), backbone_weights=False
    ).eval()
    masked.load_state_dict(plain.state_dict())
    images = torch.rand(1, 3, 32, 32)
    dim, grid, queries = 32, 4, 3
    tokens = queries + 1 + grid * grid
    per_prediction = 5 * tokens * dim + head_flops(queries, dim, 4, grid) + 4 * queries * grid**2
    extra = count_flops(masked, images)["flops"] - count_flops(plain, images)["flops"]
    assert extra == 2 * per_prediction


def test_params_count_every_parameter_once_and_meta_build_agrees():
    cfg = get_cfg(TINY_CONFIG, HAND_OVERRIDES)
    model = build_model(cfg, backbone_weights=False)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert benchmark(cfg, flops=False)["params"] == count_parameters(model)


@pytest.mark.parametrize(
    "image_size, crops", [((512, 683), 2), ((512, 512), 1), ((700, 512), 2), ((512, 1600), 4)]
)
def test_semantic_crops_follow_the_windows(image_size, crops):
    cfg = get_cfg(REPO / "configs/ade20k/semantic/eomt_large_512.yaml")
    assert crops_per_image(cfg, image_size) == (crops, image_size)


def test_semantic_crops_defaults_and_errors():
    ade = get_cfg(REPO / "configs/ade20k/semantic/eomt_large_512.yaml")
    cityscapes = get_cfg(REPO / "configs/cityscapes/semantic/eomt_large_1024.yaml")
    assert crops_per_image(ade) == (2, (512, 683))
    assert crops_per_image(cityscapes) == (2, (1024, 2048))
    assert crops_per_image(get_cfg(TINY_CONFIG)) == (1, None)
    synthetic_semantic = get_cfg(TINY_CONFIG, ["task=semantic"])
    with pytest.raises(ValueError, match="synthetic_panoptic"):
        crops_per_image(synthetic_semantic)


def test_semantic_flops_cover_every_window():
    cfg = get_cfg(TINY_CONFIG, [*HAND_OVERRIDES, "task=semantic"])
    one = benchmark(cfg, image_size=(32, 32))
    three = benchmark(cfg, image_size=(32, 90))
    assert (one["crops_per_image"], three["crops_per_image"]) == (1, 3)
    assert three["gflops_per_crop"] == one["gflops"]
    assert three["gflops"] == pytest.approx(3 * one["gflops"], abs=0.01)


def write_tiny_configs(tmp_path) -> list[str]:
    paths = []
    for name, depth in (("a", 2), ("b", 3)):
        path = tmp_path / f"tiny_{name}.yaml"
        path.write_text(
            f"_BASE_: {TINY_CONFIG}\n"
            f"model:\n  backbone_kwargs: {{embed_dim: 32, depth: {depth}, num_heads: 2}}\n"
            "input:\n  image_size: [32, 32]\n"
        )
        paths.append(str(path))
    return paths


def test_cli_prints_one_json_line_per_config(tmp_path, capsys):
    cli = load_cli()
    configs = write_tiny_configs(tmp_path)
    cli.main(cli.parse_args(["--config-file", *configs]))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["config"] for r in records] == configs
    for record, config in zip(records, configs):
        model = build_model(get_cfg(config), backbone_weights=False).eval()
        assert record["params"] == count_parameters(model)
        flops = count_flops(model, torch.rand(1, 3, 32, 32))["flops"]
        assert record["gflops"] == round(flops / 1e9, 2)
        assert "fps" not in record
    # One more block: more parameters and more FLOPs.
    assert records[1]["params"] > records[0]["params"]
    assert all(r["params_trainable"] == r["params"] for r in records)
    # Named for tools/report.py --benchmark: one name per config.
    cli.main(cli.parse_args(["--config-file", *configs, "--no-gflops", "--run", "one", "two"]))
    lines = tmp_path / "bench.jsonl"
    lines.write_text(capsys.readouterr().out)
    named = read_benchmarks([lines])
    assert list(named) == ["one", "two"]
    assert [named[n]["params"] for n in ("one", "two")] == [r["params"] for r in records]


@pytest.mark.parametrize("name", ["eomt", "pmt", "dense"])
def test_trainable_parameters_leave_out_the_frozen_backbone(name):
    overrides = [*HAND_OVERRIDES, f"model.name={name}", "model.frozen_blocks=-1"]
    if name == "dense":
        overrides += ["task=semantic", "test.metrics=[semantic]", "dense.head=dpt"]
        overrides += ["dataset.name=synthetic_semantic"]
    cfg = get_cfg(TINY_CONFIG, overrides)
    record = benchmark(cfg, flops=False, image_size=(32, 48))
    model = build_model(cfg, backbone_weights=False)
    head = count_parameters(model) - count_parameters(model.backbone)
    assert record["params"] == count_parameters(model)
    assert record["params_trainable"] == head > 0


def test_cli_table_and_cpu_fps(tmp_path, capsys):
    cli = load_cli()
    configs = write_tiny_configs(tmp_path)
    args = ["--config-file", *configs, "--fps", "--device", "cpu", "--warmup", "1"]
    cli.main(cli.parse_args([*args, "--iterations", "2", "--no-gflops", "--table"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "| Config | Params (M) | Trainable (M) | GFLOPs | FPS |",
        "|---|---|---|---|---|",
    ]
    assert len(lines) == 4
    for line, config in zip(lines[2:], configs):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        params = count_parameters(build_model(get_cfg(config), backbone_weights=False))
        assert cells[:4] == [config, f"{params / 1e6:.1f}", f"{params / 1e6:.1f}", "-"]
        assert float(cells[4]) > 0

    # An override right after the config files applies to them, it is not a config.
    args = ["--config-file", configs[0], "model.num_queries=5", *args[1 + len(configs) :]]
    cli.main(cli.parse_args([*args, "--iterations", "2"]))
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["config"] == configs[0]
    assert record["overrides"] == ["model.num_queries=5"]
    assert record["device"] == "cpu" and record["precision"] == "fp32"
    assert record["autocast"] == "none" and record["relative_error"] < 1e-6
    assert record["iterations"] == 2 and record["warmup"] == 1
    assert record["fps"] > 0 and record["peak_memory_mb"] > 0
    assert "not comparable" in record["note"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--config-file", "model.a=1"],
        ["--config-file", "x.yaml", "--batch-size", "0"],
        ["--config-file", "x.yaml", "y.yaml", "--run", "only_one"],
        ["--config-file", "x.yaml", "--weights-dtype", "bf16", "--autocast", "bf16"],
    ],
)
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        load_cli().parse_args(argv)


def test_fps_device_is_checked_before_building():
    cfg = get_cfg(TINY_CONFIG, HAND_OVERRIDES)
    with pytest.raises(ValueError, match="'mps'"):
        benchmark(cfg, fps=True, device="mps")


def test_fps_runs_the_precision_it_reports_against_the_float32_forward():
    cfg = get_cfg(TINY_CONFIG, HAND_OVERRIDES)
    timed = {"flops": False, "fps": True, "warmup": 1, "iterations": 1}
    amp = benchmark(cfg, autocast="bf16", **timed)
    assert amp["precision"] == "fp32 weights + bf16 autocast" and amp["autocast"] == "bf16"
    half = benchmark(cfg, weights_dtype="fp16", **timed)
    assert half["precision"] == "fp16 weights" and half["autocast"] == "none"
    # Both computed something else than float32, within half precision.
    assert 1e-5 < amp["relative_error"] < 3e-2 and 1e-5 < half["relative_error"] < 3e-2


@pytest.mark.slow
def test_compiled_cpu_fps():
    cfg = get_cfg(TINY_CONFIG, HAND_OVERRIDES)
    result = benchmark(cfg, flops=False, fps=True, compile_mode="default", warmup=1, iterations=2)
    assert result["compile_mode"] == "default" and result["fps"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fps_in_bf16():
    cfg = get_cfg(TINY_CONFIG, [*HAND_OVERRIDES, "task=semantic"])
    result = benchmark(cfg, fps=True, device="cuda", image_size=(32, 64), warmup=2, iterations=5)
    assert result["precision"] == "fp32 weights + bf16 autocast" and result["device"] != "cpu"
    assert result["crops_per_image"] == 2 and result["fps"] > 0 and result["peak_memory_mb"] > 0


def test_loss_benchmark_times_the_matcher_and_the_loss_at_given_shapes(capsys):
    from tools import benchmark_loss

    threads = torch.get_num_threads()
    args = ["--queries", "6", "--classes", "3", "--targets", "2", "--input", "32"]
    records = benchmark_loss.main([*args, "--points", "50", "--depths", "2", "--rounds", "2"])
    assert [r["run"] for r in records] == ["matcher", "loss"]
    assert records[0]["mask_logits"] == [8, 8] and records[1]["depths"] == 2
    assert all(0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in records)
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert torch.get_num_threads() == threads  # the tests after it keep their numbers


def test_cpu_profile_kinds_add_up_to_the_count_and_the_forward():
    cfg = get_cfg(TINY_CONFIG, HAND_OVERRIDES)
    profile = cpu_profile(cfg, warmup=1, iterations=2, matmul_size=256)
    model = build_model(cfg, backbone_weights=False).eval()
    counted = count_flops(model, torch.rand(1, 3, 32, 32))
    kinds = profile["kinds"]
    assert list(kinds) == ["linear", "attention", "convolution", "other"]
    # Every fvcore FLOP in exactly one kind.
    assert sum(kind["flops"] for kind in kinds.values()) == counted["flops"] == profile["flops"]
    # A ViT: attention products counted and timed; the transposed conv of the upscaling too.
    for kind in ("linear", "attention", "convolution"):
        assert kinds[kind]["flops"] > 0 and kinds[kind]["ms"] > 0, kind
        assert kinds[kind]["fraction_of_matmul_rate"] > 0, kind
    attention = counted["by_operator"]["scaled_dot_product_attention"]
    assert kinds["attention"]["flops"] == attention
    # The kinds do not overlap: their times sum to at most the forward's wall clock.
    measured = sum(kinds[kind]["ms"] for kind in ("linear", "attention", "convolution"))
    assert measured <= profile["forward_ms"]
    assert kinds["other"]["ms"] >= 0
    # Both rounded to 0.01 ms.
    each = profile["forward_ms_each"]
    assert profile["forward_ms"] == pytest.approx(statistics.fmean(each), abs=0.01)
    assert sum(kind["time_fraction"] for kind in kinds.values()) == pytest.approx(1, abs=1e-3)
    assert profile["matmul_gflops_per_s"] > 0 and profile["iterations"] == 2


def test_flop_kinds_of_fvcore_operators():
    assert [flop_kind(op) for op in ("linear", "matmul", "einsum", "bmm", "addmm")] == [
        "linear"
    ] * 5
    assert flop_kind("scaled_dot_product_attention") == "attention"
    assert flop_kind("conv") == "convolution"
    assert flop_kind("layer_norm") == flop_kind("upsample_bilinear2d") == "other"


def test_cli_cpu_profile_json_and_table(tmp_path, capsys):
    cli = load_cli()
    configs = write_tiny_configs(tmp_path)
    args = ["--config-file", configs[0], "--cpu-profile", "--matmul-size", "256"]
    cli.main(cli.parse_args([*args, "--iterations", "1"]))
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["config"] == configs[0] and record["iterations"] == 1
    for key in ("gflops", "forward_ms", "kinds", "matmul_gflops_per_s", "threads", "device"):
        assert key in record, key
    for kind in ("linear", "attention", "convolution", "other"):
        assert set(record["kinds"][kind]) == {
            "flops",
            "gflops",
            "ms",
            "time_fraction",
            "achieved_gflops_per_s",
            "fraction_of_matmul_rate",
        }
    cli.main(cli.parse_args([*args, "--iterations", "1", "--table"]))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| Config | Kind | GFLOPs | ms |")
    assert [line.split("|")[2].strip() for line in lines[2:]] == [
        "linear",
        "attention",
        "convolution",
        "other",
        "forward",
    ]


@pytest.mark.parametrize(
    "extra",
    [
        ["--fps"],
        ["--device", "cuda"],
        ["--batch-size", "2"],
        ["--no-gflops"],
        ["--image-size", "64", "64"],
        ["--matmul-size", "0"],
        ["--compile"],
        ["--sdpa-backend", "math"],
        ["--weights-dtype", "bf16"],
        ["--autocast", "bf16"],
    ],
    ids=str,
)
def test_cli_cpu_profile_refuses_what_it_does_not_measure(extra, capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--config-file", str(TINY_CONFIG), "--cpu-profile", *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and extra[0] in error
