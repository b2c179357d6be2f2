"""Weights in and out: official release and Hugging Face layouts, inferred configs, deltas,
partial loading and refusal of pickles that would run code."""

import os
import pickle
import runpy
import sys

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from eomt import from_checkpoint, load_checkpoint
from eomt.config import get_cfg
from eomt.modeling import build_model
from eomt.weights import load_model
from eomt.weights.architecture import infer_config
from eomt.weights.export import official_state_dict
from eomt.weights.files import save_weights
from eomt.weights.layouts import (
    base_backbone_weights,
    hf_to_ours,
    official_to_ours,
    ours_to_hf,
    ours_to_official,
    to_ours,
)
from tools.convert_checkpoint import convert, parse_args

DIM, DEPTH, QUERIES, CLASSES, L2, SIZE = 64, 3, 6, 5, 2, 32
DINOV2 = "vit_small_patch14_reg4_dinov2"
DINOV3 = "vit_small_patch16_dinov3_qkvb"


def tiny_model(backbone=DINOV2, classes=CLASSES, seed=0, **backbone_kwargs):
    """A small EoMT with random weights everywhere (layer scales and norms included)."""
    kwargs = dict(embed_dim=DIM, depth=DEPTH, num_heads=DIM // 64, **backbone_kwargs)
    cfg = get_cfg(
        overrides={
            "model.backbone": backbone,
            "model.backbone_kwargs": kwargs,
            "model.pretrained": False,
            "model.num_classes": classes,
            "model.num_queries": QUERIES,
            "model.num_query_blocks": L2,
            "input.image_size": [SIZE, SIZE],
        }
    )
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
        model.pixel_mean.copy_(torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        model.pixel_std.copy_(torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        model.attn_mask_probs.fill_(1.0)
    return model.eval(), cfg


def predictions(model, images, masked):
    model.masked_attn = "always" if masked else "anneal"
    with torch.no_grad():
        return model(images)


def assert_same_outputs(a, b, atol=0.0):
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for masked in (True, False):
        first, second = predictions(a, images, masked), predictions(b, images, masked)
        assert len(first) == len(second) == (L2 + 1 if masked else 1)
        for p, q in zip(first, second):
            for key in ("mask_logits", "class_logits"):
                torch.testing.assert_close(p[key], q[key], atol=atol, rtol=0)


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def official_dinov3_state(model) -> dict:
    """What the official code stores for a DINOv3 EoMT, written out key by key: transformers'
    DINOv3ViTModel names under network.encoder.backbone, q/k/v separate, no key bias."""
    ours = model.state_dict()
    prefix = "network.encoder.backbone."
    state = {
        prefix + "patch_embed.cls_token": ours["backbone.cls_token"],
        prefix + "patch_embed.register_tokens": ours["backbone.reg_token"],
        prefix + "patch_embed.patch_embeddings.weight": ours["backbone.patch_embed.proj.weight"],
        prefix + "patch_embed.patch_embeddings.bias": ours["backbone.patch_embed.proj.bias"],
        prefix + "norm.weight": ours["backbone.norm.weight"],
        prefix + "norm.bias": ours["backbone.norm.bias"],
        "network.encoder.pixel_mean": ours["pixel_mean"],
        "network.encoder.pixel_std": ours["pixel_std"],
        "network.q.weight": ours["queries.weight"],
        "network.attn_mask_probs": ours["attn_mask_probs"],
        "criterion.empty_weight": torch.ones(CLASSES + 1),
    }
    for i in range(DEPTH):
        b, t = f"backbone.blocks.{i}.", f"{prefix}blocks.{i}."
        q, k, v = ours[b + "attn.qkv.weight"].split(DIM)
        state.update(
            {
                t + "norm1.weight": ours[b + "norm1.weight"],
                t + "norm1.bias": ours[b + "norm1.bias"],
                t + "attention.q_proj.weight": q,
                t + "attention.k_proj.weight": k,
                t + "attention.v_proj.weight": v,
                t + "attention.q_proj.bias": ours[b + "attn.q_bias"],
                t + "attention.v_proj.bias": ours[b + "attn.v_bias"],
                t + "attention.o_proj.weight": ours[b + "attn.proj.weight"],
                t + "attention.o_proj.bias": ours[b + "attn.proj.bias"],
                t + "layer_scale1.lambda1": ours[b + "gamma_1"],
                t + "norm2.weight": ours[b + "norm2.weight"],
                t + "norm2.bias": ours[b + "norm2.bias"],
                t + "mlp.up_proj.weight": ours[b + "mlp.fc1.weight"],
                t + "mlp.up_proj.bias": ours[b + "mlp.fc1.bias"],
                t + "mlp.down_proj.weight": ours[b + "mlp.fc2.weight"],
                t + "mlp.down_proj.bias": ours[b + "mlp.fc2.bias"],
                t + "layer_scale2.lambda1": ours[b + "gamma_2"],
            }
        )
    for key, value in ours.items():
        if key.startswith(("class_head.", "mask_head.", "upscale.")):
            state["network." + key] = value
    return state


# -- official ------------------------------------------------------------------------------------


def test_official_dinov2_file_loads_without_config(tmp_path):
    model, _ = tiny_model()
    state = {
        "network.encoder.backbone." + k[len("backbone.") :]: v
        for k, v in model.state_dict().items()
        if k.startswith("backbone.")
    }
    state.update(
        {
            "network.encoder.pixel_mean": model.pixel_mean,
            "network.encoder.pixel_std": model.pixel_std,
            "network.q.weight": model.queries.weight.detach(),
            "network.attn_mask_probs": model.attn_mask_probs,
            "criterion.empty_weight": torch.ones(CLASSES + 1),
        }
    )
    for key, value in model.state_dict().items():
        if key.startswith(("class_head.", "mask_head.", "upscale.")):
            state["network." + key] = value
    torch.save(state, tmp_path / "pytorch_model.bin")
    # The authors' Lightning checkpoints hold the same under 'state_dict'.
    torch.save({"state_dict": state, "epoch": 11, "global_step": 7}, tmp_path / "last.ckpt")

    for name in ("pytorch_model.bin", "last.ckpt"):
        loaded, cfg, categories = load_model(tmp_path / name)
        assert cfg.model.backbone == DINOV2
        assert dict(cfg.model.backbone_kwargs) == {
            "embed_dim": DIM,
            "depth": DEPTH,
            "num_heads": 1,
            "mlp_ratio": 4.0,
        }
        assert list(cfg.input.image_size) == [SIZE, SIZE]  # from the 2x2 pos_embed grid
        assert cfg.model.patch_size == 16
        assert (cfg.model.num_classes, cfg.model.num_queries) == (CLASSES, QUERIES)
        assert cfg.model.num_query_blocks == L2
        assert [c["name"] for c in categories] == [f"class {i}" for i in range(CLASSES)]
        assert_same_outputs(model, loaded.eval())
    expected = {k: v for k, v in state.items() if k != "criterion.empty_weight"}
    assert_same_state(ours_to_official(model.state_dict()), expected)


def test_position_embeddings_are_resampled_to_another_input_size(tmp_path):
    model, _ = tiny_model()
    torch.save(official_state_dict(model), tmp_path / "pytorch_model.bin")
    larger, cfg, _ = load_model(tmp_path / "pytorch_model.bin", image_size=(2 * SIZE, 3 * SIZE))
    assert list(cfg.input.image_size) == [2 * SIZE, 3 * SIZE]
    expected = resample_abs_pos_embed(model.backbone.pos_embed, [4, 6], num_prefix_tokens=0)
    assert torch.equal(larger.backbone.pos_embed, expected)
    with torch.no_grad():
        output = larger.eval()(torch.rand(1, 3, 2 * SIZE, 3 * SIZE))[-1]
    assert output["mask_logits"].shape == (1, QUERIES, SIZE // 2, 3 * SIZE // 4)


def test_official_dinov3_file_matches_hand_fused_weights(tmp_path):
    model, _ = tiny_model(DINOV3)
    state = official_dinov3_state(model)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded, cfg, _ = load_model(tmp_path / "pytorch_model.bin", image_size=(SIZE, SIZE))
    assert cfg.model.backbone == DINOV3  # q and v biases: timm's DINOv3 with qkv bias
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert_same_outputs(model, loaded.eval())
    assert_same_state(
        ours_to_official(model.state_dict()),
        {k: v for k, v in state.items() if k != "criterion.empty_weight"},
    )
    assert_same_state(official_to_ours(state), model.state_dict())


@pytest.mark.parametrize(
    "backbone, kwargs",
    [
        (DINOV2, {}),
        (DINOV3, {}),
        ("vit_giant_patch14_reg4_dinov2", {"mlp_ratio": 512 / DIM}),  # packed SwiGLU
        ("vit_small_plus_patch16_dinov3", {"mlp_ratio": 4.0}),  # separate SwiGLU halves
    ],
)
def test_round_trips_keep_every_tensor(backbone, kwargs):
    model, _ = tiny_model(backbone, **kwargs)
    state = model.state_dict()
    assert_same_state(to_ours(ours_to_official(state)), state)
    assert_same_state(hf_to_ours(ours_to_hf(state)), state)
    # Official -> HF goes through ours.
    assert_same_state(to_ours(ours_to_hf(to_ours(ours_to_official(state)))), state)


def test_inferred_config_builds_the_same_architecture():
    for backbone, kwargs in [(DINOV2, {}), ("vit_giant_patch14_reg4_dinov2", {"mlp_ratio": 8.0})]:
        model, _ = tiny_model(backbone, **kwargs)
        cfg = get_cfg(overrides=infer_config(model.state_dict()))
        rebuilt = build_model(cfg)
        shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
        assert shapes == {k: v.shape for k, v in model.state_dict().items()}
    # The released sizes get their timm names and no overrides.
    state = {
        "queries.weight": torch.zeros(200, 1024),
        "class_head.weight": torch.zeros(134, 1024),
        "attn_mask_probs": torch.zeros(4),
        "backbone.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16),
        "backbone.pos_embed": torch.zeros(1, 1600, 1024),
        "backbone.reg_token": torch.zeros(1, 4, 1024),
        "backbone.blocks.0.ls1.gamma": torch.zeros(1024),
        "backbone.blocks.0.mlp.fc1.weight": torch.zeros(4096, 1024),
        "backbone.blocks.0.mlp.fc2.weight": torch.zeros(1024, 4096),
    }
    state.update({f"backbone.blocks.{i}.norm1.weight": torch.zeros(1024) for i in range(24)})
    config = infer_config(state)
    assert config["model.backbone"] == "vit_large_patch14_reg4_dinov2"
    assert config["model.backbone_kwargs"] == {}
    assert config["input.image_size"] == [640, 640]
    assert (config["task"], config["dataset.name"]) == ("panoptic", "coco_panoptic")


# -- delta weights -------------------------------------------------------------------------------


def test_official_dinov3_deltas_need_and_use_the_base_weights(tmp_path):
    model, _ = tiny_model(DINOV3)
    absolute = official_dinov3_state(model)
    # The DINOv3 weights the deltas are relative to: another model's backbone, saved in timm's
    # layout and in transformers' DINOv3ViTModel layout (`embeddings.*`, `layer.N.*`).
    base_model, _ = tiny_model(DINOV3, seed=3)
    base_timm = {
        k[len("backbone.") :]: v
        for k, v in base_model.state_dict().items()
        if k.startswith("backbone.")
    }
    prefix = "network.encoder.backbone."
    renames = (("patch_embed.", "embeddings."), ("blocks.", "layer."), ("norm.", "norm."))
    base_official = {
        k[len(prefix) :]: v
        for k, v in official_dinov3_state(base_model).items()
        if k.startswith(prefix)
    }
    base_hf = {
        new + k[len(old) :]: v
        for k, v in base_official.items()
        for old, new in renames
        if k.startswith(old)
    }
    base_hf["embeddings.mask_token"] = torch.zeros(1, 1, DIM)  # pretraining only
    initial = {
        "network.encoder.pixel_mean": model.pixel_mean,
        "network.encoder.pixel_std": model.pixel_std,
        "network.attn_mask_probs": torch.ones(L2),
    }
    delta = {}
    for key, value in absolute.items():
        if key.startswith(prefix):
            delta[key] = value - base_official[key[len(prefix) :]]
        else:
            delta[key] = value - initial[key] if key in initial else value
    torch.save(delta, tmp_path / "delta.bin")
    save_file(base_hf, str(tmp_path / "dinov3_hf.safetensors"))
    save_file(base_timm, str(tmp_path / "dinov3_timm.safetensors"))

    with pytest.raises(ValueError, match="delta weights.*base"):
        from_checkpoint(tmp_path / "delta.bin", image_size=(SIZE, SIZE))
    loaded = from_checkpoint(
        tmp_path / "delta.bin",
        base_weights=tmp_path / "dinov3_hf.safetensors",
        image_size=(SIZE, SIZE),
    ).eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=1e-6, rtol=0)
    assert_same_outputs(model, loaded, atol=1e-4)
    # The base in timm's layout gives the same model.
    target, _ = tiny_model(DINOV3, seed=9)
    load_checkpoint(
        target, tmp_path / "delta.bin", base_weights=tmp_path / "dinov3_timm.safetensors"
    )
    assert_same_state(target.state_dict(), loaded.state_dict())


def test_base_weights_in_meta_dinov3_layout():
    model, _ = tiny_model(DINOV3)
    timm_state = {k[9:]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    # Meta's release: storage tokens, fused qkv bias with a zero key part, ls1/ls2, rope periods.
    meta = {"mask_token": torch.zeros(1, DIM), "rope_embed.periods": torch.ones(8)}
    for key, value in timm_state.items():
        if key.endswith("attn.q_bias"):
            attn = key[: -len("q_bias")]
            v_bias = timm_state[attn + "v_bias"]
            meta[attn + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), v_bias])
            meta[attn + "qkv.bias_mask"] = torch.ones(3 * DIM)
        elif not key.endswith("attn.v_bias"):
            name = "storage_tokens" if key == "reg_token" else key
            meta[name.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")] = value
    assert_same_state(base_backbone_weights(meta, model.backbone), timm_state)


# -- partial loading, reports, safety ------------------------------------------------------------


def test_new_class_head_loads_partially_and_strict_names_the_group(tmp_path):
    source, _ = tiny_model(classes=9)
    torch.save(official_state_dict(source), tmp_path / "pytorch_model.bin")
    target, _ = tiny_model(classes=CLASSES, seed=4)
    head_before = target.class_head.weight.detach().clone()
    with pytest.raises(ValueError) as error:
        load_checkpoint(target, tmp_path / "pytorch_model.bin")
    assert "class_head: 2 wrong shape: class_head.weight: file (10, 64), model (6, 64); " in str(
        error.value
    )
    report = load_checkpoint(target, tmp_path / "pytorch_model.bin", strict=False)
    assert report == {
        "missing": [],
        "unexpected": [],
        "wrong_shape": {
            "class_head.weight": ((10, DIM), (6, DIM)),
            "class_head.bias": ((10,), (6,)),
        },
    }
    assert torch.equal(target.class_head.weight, head_before)
    for key, value in source.state_dict().items():
        if not key.startswith("class_head."):
            assert torch.equal(target.state_dict()[key], value), key


def test_mismatch_report_groups_keys(tmp_path):
    model, _ = tiny_model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.blocks.2.")}
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(ValueError) as error:
        load_checkpoint(model, tmp_path / "model.pth")
    message = str(error.value)
    assert "backbone.blocks: 14 missing: backbone.blocks.2.attn.proj.bias, " in message
    assert "extra: 1 unexpected: extra.weight" in message


class RunsCode:
    """Unpickling this object would create a directory: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    model, _ = tiny_model()
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": model.state_dict(), "payload": RunsCode(marker)}, f, protocol=2)
    torch.save({"state_dict": {"payload": RunsCode(marker)}}, tmp_path / "evil.ckpt")
    for name in ("evil.pth", "evil.ckpt"):
        with pytest.raises(ValueError, match="refused: it holds objects other than tensors"):
            load_checkpoint(model, tmp_path / name)
        with pytest.raises(ValueError, match="refused: it holds objects other than tensors"):
            from_checkpoint(tmp_path / name)
    assert not os.path.exists(marker)


def test_own_checkpoint_keeps_its_config_and_classes(tmp_path):
    model, cfg = tiny_model()
    categories = [
        {"id": 7 + i, "name": f"c{i}", "isthing": 1, "color": [i, 0, 0]} for i in range(CLASSES)
    ]
    from omegaconf import OmegaConf

    torch.save(
        {
            "model": model.state_dict(),
            "cfg": OmegaConf.to_container(cfg),
            "categories": categories,
            "iteration": 3,
        },
        tmp_path / "model_0000003.pth",
    )
    loaded, loaded_cfg, loaded_categories = load_model(tmp_path / "model_0000003.pth")
    assert loaded_categories == categories
    assert loaded_cfg == cfg
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_not_eomt_weights_get_a_clear_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not EoMT weights.*conv.weight"):
        from_checkpoint(tmp_path / "other.pth")


# -- Hugging Face (needs transformers) -------------------------------------------------------------


@pytest.mark.parametrize("backbone", [DINOV2, DINOV3])
def test_hugging_face_round_trip_with_transformers(tmp_path, backbone):
    transformers = pytest.importorskip("transformers")
    from eomt.weights.export import save_hf

    model, _ = tiny_model(backbone)
    categories = [
        {"id": i, "name": f"thing {i}", "isthing": 1, "color": [0, 0, 0]} for i in range(CLASSES)
    ]
    save_hf(model, categories, tmp_path / "hf")
    hf_class = (
        transformers.EomtForUniversalSegmentation
        if backbone == DINOV2
        else transformers.EomtDinov3ForUniversalSegmentation
    )
    hf_model = hf_class.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    images = torch.rand(2, 3, SIZE, SIZE)
    for masked in (True, False):
        hf_model.attn_mask_probs.fill_(1.0 if masked else 0.0)
        with torch.no_grad():
            theirs = hf_model((images - model.pixel_mean) / model.pixel_std)
        ours = predictions(model, images, masked)[-1]
        torch.testing.assert_close(
            ours["mask_logits"], theirs.masks_queries_logits, atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            ours["class_logits"], theirs.class_queries_logits, atol=1e-4, rtol=0
        )
    # Back from what transformers wrote, with names from config.json.
    hf_model.attn_mask_probs.fill_(1.0)
    hf_model.save_pretrained(tmp_path / "again")
    loaded, cfg, loaded_categories = load_model(tmp_path / "again")
    assert [c["name"] for c in loaded_categories] == [c["name"] for c in categories]
    assert_same_outputs(model, loaded.eval())


# -- tools/convert_checkpoint.py -----------------------------------------------------------------


def test_convert_tool_chain_returns_the_same_file(tmp_path, capsys):
    model, cfg = tiny_model(DINOV3)
    torch.save(official_state_dict(model, cfg.loss.no_object_weight), tmp_path / "official.bin")
    size = ["--image-size", str(SIZE), str(SIZE)]  # DINOv3 weights do not hold it
    steps = [
        ("official.bin", "ours.safetensors", "ours"),
        ("ours.safetensors", "hf", "hf"),
        ("hf", "ours.pth", "ours"),
        ("ours.pth", "back.bin", "official"),
    ]
    for source, target, kind in steps:
        args = [str(tmp_path / source), str(tmp_path / target), "--to", kind, "--check", *size]
        convert(parse_args(args))
    printed = capsys.readouterr().out
    assert printed.count("max |difference| 0") == 2 * len(steps), printed
    assert_same_state(torch.load(tmp_path / "back.bin"), torch.load(tmp_path / "official.bin"))
    assert_same_outputs(model, from_checkpoint(tmp_path / "ours.pth").eval())


def test_convert_tool_refuses_a_layout_that_cannot_hold_the_model_and_leaves_nothing(
    tmp_path, monkeypatch, capsys
):
    """A DeiT backbone: the official layout reads back as DINOv2, and HF holds no such EoMT."""
    model, cfg = tiny_model("vit_small_patch16_224")
    save_weights(model, cfg, None, tmp_path / "ours.safetensors")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(
        ValueError, match="(?s)the official layout cannot hold this model .*nothing was written"
    ):
        convert(
            parse_args(
                [str(tmp_path / "ours.safetensors"), str(tmp_path / "o.bin"), "--to", "official"]
            )
        )
    assert sorted(tmp_path.iterdir()) == before
    argv = [
        "convert_checkpoint.py",
        str(tmp_path / "ours.safetensors"),
        str(tmp_path / "hf"),
        "--to",
        "hf",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        runpy.run_path("tools/convert_checkpoint.py", run_name="__main__")
    assert str(stop.value.code).startswith(
        f"error: converting {tmp_path / 'ours.safetensors'} to hf: "
    )
    assert sorted(tmp_path.iterdir()) == before
