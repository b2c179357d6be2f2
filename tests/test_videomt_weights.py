"""VidEoMT weights: the authors' detectron2 checkpoints (tue-mps/videomt), their image
"segmenter" weights, transformers' VideomtForUniversalSegmentation and EoMT image checkpoints
load with `from_checkpoint` and give the outputs of the weights they hold.

The foreign layouts are written here by renaming our keys; the parity with the authors' code
and with transformers themselves is in docs/video.md (their models, run in scratch)."""

import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from eomt import from_checkpoint, load_checkpoint
from eomt.config import get_cfg
from eomt.modeling import EoMT, VidEoMT, build_model
from eomt.weights import load_model
from eomt.weights.architecture import infer_config
from eomt.weights.files import save_weights
from eomt.weights.layouts import ours_to_hf, ours_to_official
from tools.convert_checkpoint import convert, parse_args

DIM, DEPTH, QUERIES, CLASSES, L2, SIZE, FRAMES = 64, 3, 6, 5, 2, 32, 3
DINOV2 = "vit_small_patch14_reg4_dinov2"
DINOV3 = "vit_small_patch16_dinov3"


def tiny(name="videomt", backbone=DINOV2, classes=CLASSES, seed=0, norm_queries=False):
    """A small VidEoMT (or EoMT) with random weights everywhere (layer scales included)."""
    cfg = get_cfg(
        overrides={
            "model.name": name,
            "model.backbone": backbone,
            "model.backbone_kwargs": dict(embed_dim=DIM, depth=DEPTH, num_heads=1),
            "model.pretrained": False,
            "model.num_classes": classes,
            "model.num_queries": QUERIES,
            "model.num_query_blocks": L2,
            "model.masked_attn": "never" if name == "videomt" else "anneal",
            "videomt.norm_queries": norm_queries,
            "input.image_size": [SIZE, SIZE],
        }
    )
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point() and key not in ("pixel_mean", "pixel_std"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
        model.attn_mask_probs.fill_(1.0)
    return model.eval(), cfg


def clip():
    return torch.rand(1, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def assert_same_video_outputs(a, b, frames=range(FRAMES)):
    with torch.no_grad():
        first, second = a(clip()), b(clip())
    for t in frames:
        for key in ("mask_logits", "class_logits"):
            torch.testing.assert_close(first[t][key], second[t][key], atol=1e-5, rtol=0)


def as_authors(state: dict) -> dict:
    """Our VidEoMT weights in the layout of the authors' meta-architecture (`videomt_online`):
    the backbone module `backbone.` holds the ViT wrapper `encoder.backbone`, the queries `q`,
    and the rest under its own names; the loss's class weights sit beside; the image statistics
    are not saved."""
    out = {"criterion.empty_weight": torch.ones(CLASSES + 1)}
    for key, value in state.items():
        if key.startswith("backbone."):
            out["backbone.encoder." + key] = value
        elif key == "queries.weight":
            out["backbone.q.weight"] = value
        elif key not in ("pixel_mean", "pixel_std"):
            out["backbone." + key] = value
    return out


def save_authors(state: dict, path):
    torch.save({"model": as_authors(state), "iteration": 1000}, path)
    return path


def test_authors_checkpoint_loads_with_equal_outputs(tmp_path):
    model, _ = tiny()
    path = save_authors(model.state_dict(), tmp_path / "yt_2019_vit_small.pth")
    assert "backbone.encoder.backbone.blocks.0.attn.qkv.weight" in torch.load(path)["model"]
    loaded, cfg, _ = load_model(path)
    assert isinstance(loaded, VidEoMT) and not loaded.norm_queries
    assert (cfg.model.name, cfg.model.masked_attn, cfg.model.num_query_blocks) == (
        "videomt",
        "never",
        L2,
    )
    assert cfg.model.num_classes == CLASSES and cfg.model.num_queries == QUERIES
    assert_same_video_outputs(model, loaded.eval())
    # And into a model built from a config, as the trainer or evaluator loads weights.
    built = build_model(cfg, backbone_weights=False)
    assert load_checkpoint(built, path) == {"missing": [], "unexpected": [], "wrong_shape": {}}
    assert_same_video_outputs(model, built.eval())


def test_authors_norm_queries_is_given(tmp_path):
    """NORM_QUERIES is in their config, not in the weights: `norm_queries=True` sets it."""
    model, _ = tiny(norm_queries=True)
    path = save_authors(model.state_dict(), tmp_path / "vipseg.pth")
    loaded = from_checkpoint(path, norm_queries=True).eval()
    assert loaded.norm_queries
    assert_same_video_outputs(model, loaded)
    with torch.no_grad():
        plain = from_checkpoint(path).eval()(clip())
        normed = loaded(clip())
    assert torch.equal(plain[0]["class_logits"], normed[0]["class_logits"])  # frame 0: same
    assert not torch.allclose(plain[1]["class_logits"], normed[1]["class_logits"])


def test_authors_dinov3_checkpoint(tmp_path):
    """Their DINOv3 backbone is transformers' DINOv3 with the names of EoMT's official DINOv3
    layout (`patch_embed.*`, `blocks.N.attention.*`), here under `backbone.encoder.backbone.`;
    `fused_qkv` files hold one `qkv_proj` per block."""
    model, _ = tiny(backbone=DINOV3)
    official = ours_to_official(model.state_dict())
    state = as_authors(
        {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    )
    state.update(
        {
            "backbone." + k[len("network.") :]: v
            for k, v in official.items()
            if k.startswith("network.encoder.backbone.")
        }
    )
    assert "backbone.encoder.backbone.blocks.0.attention.q_proj.weight" in state
    block = "backbone.encoder.backbone.blocks.1.attention."
    state[block + "qkv_proj.weight"] = torch.cat(
        [state.pop(block + f"{n}_proj.weight") for n in "qkv"]
    )
    path = tmp_path / "yt_2019_dinov3.pth"
    torch.save({"model": state}, path)
    loaded, cfg, _ = load_model(path, image_size=(SIZE, SIZE))
    assert cfg.model.backbone == DINOV3 and isinstance(loaded, VidEoMT)
    assert_same_video_outputs(model, loaded.eval())


def test_authors_segmenter_weights_get_a_new_query_updater(tmp_path):
    """Their training starts from image "segmenter" weights in the same layout without the
    query updater: VidEoMT with a freshly initialised one, and a warning."""
    model, _ = tiny()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("query_updater.")}
    path = save_authors(state, tmp_path / "yt_2019_small_segmenter.pth")
    with pytest.warns(UserWarning, match="query updater is freshly initialised"):
        loaded = from_checkpoint(path).eval()
    assert isinstance(loaded, VidEoMT)
    assert not torch.equal(loaded.query_updater.weight, model.query_updater.weight)
    assert_same_video_outputs(model, loaded, frames=[0])  # frame 0 does not use it


def test_eomt_image_checkpoint_initialises_videomt(tmp_path):
    """Ours (with its config) and the official layout, with video=True: VidEoMT whose first
    frame is the image model's prediction."""
    eomt, cfg = tiny(name="eomt")
    ours = save_weights(eomt, cfg, None, tmp_path / "eomt.safetensors")
    official = tmp_path / "pytorch_model.bin"
    torch.save(ours_to_official(eomt.state_dict()), official)
    with torch.no_grad():
        image = eomt(clip()[:, 0])[-1]
    for path in (ours, official):
        assert type(from_checkpoint(path)) is EoMT
        with pytest.warns(UserWarning, match="freshly initialised"):
            video, video_cfg, _ = load_model(path, video=True)
        assert isinstance(video, VidEoMT)
        assert (video_cfg.model.name, video_cfg.model.masked_attn) == ("videomt", "never")
        with torch.no_grad():
            first = video.eval()(clip())[0]
        for key in ("mask_logits", "class_logits"):
            torch.testing.assert_close(first[key], image[key], atol=1e-5, rtol=0)


def test_hf_videomt_loads_with_equal_outputs(tmp_path):
    """transformers' VideomtForUniversalSegmentation: EoMT's HF layout and `query_updater.*`;
    its video processor's statistics (video_preprocessor_config.json) become the model's."""
    model, _ = tiny()
    state = ours_to_hf(model.state_dict())
    for key in ("query.weight", "query_updater.weight", "layers.0.attention.q_proj.weight"):
        assert key in state
    state["embeddings.mask_token"] = torch.zeros(1, 1, DIM)
    folder = tmp_path / "videomt-hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    config = {"model_type": "videomt", "image_size": SIZE, "num_attention_heads": 1}
    (folder / "config.json").write_text(json.dumps(config))
    statistics = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(statistics))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained model: no new query updater
        loaded = from_checkpoint(folder).eval()
    assert isinstance(loaded, VidEoMT)
    assert loaded.pixel_mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])
    with torch.no_grad():
        model.pixel_mean.copy_(loaded.pixel_mean)
        model.pixel_std.copy_(loaded.pixel_std)
    assert_same_video_outputs(model, loaded)


def test_norm_queries_of_the_released_configs():
    """On for DINOv3 with 124 classes (their VIPSeg and VSPW configs), off elsewhere."""
    dinov3, _ = tiny(backbone=DINOV3, classes=124)
    dinov2, _ = tiny(classes=124)
    assert infer_config(dinov3.state_dict(), (SIZE, SIZE))["videomt.norm_queries"]
    assert not infer_config(dinov2.state_dict())["videomt.norm_queries"]
    assert infer_config(dinov2.state_dict())["task"] == "panoptic"
    assert infer_config(tiny(classes=40)[0].state_dict())["task"] == "instance"


def test_mismatched_checkpoints_are_refused(tmp_path):
    model, cfg = tiny()
    path = save_authors(model.state_dict(), tmp_path / "ovis.pth")
    other, _ = tiny(classes=CLASSES + 2)
    with pytest.raises(ValueError, match=r"class_head: 2 wrong shape.*\(6, 64\), model \(8, 64\)"):
        load_checkpoint(other, path)
    image, image_cfg = tiny(name="eomt")
    with pytest.raises(ValueError, match="query_updater: 2 unexpected"):
        load_checkpoint(image, path)
    image_file = save_weights(image, image_cfg, None, tmp_path / "eomt.safetensors")
    with pytest.raises(ValueError, match="norm_queries is VidEoMT's"):
        from_checkpoint(image_file, norm_queries=True)
    pmt_cfg = OmegaConf.to_container(get_cfg(overrides={"model.name": "pmt"}))
    pmt_file = tmp_path / "pmt.pth"
    torch.save({"model": {"queries.weight": torch.zeros(2, 2)}, "cfg": pmt_cfg}, pmt_file)
    with pytest.raises(ValueError, match="only EoMT's initialise VidEoMT"):
        load_model(pmt_file, video=True)
    truncated = tmp_path / "truncated.pth"
    state = as_authors(model.state_dict())
    del state["backbone.mask_head.0.weight"]
    torch.save({"model": state}, truncated)
    with pytest.raises(ValueError, match="mask_head: 1 missing: mask_head.0.weight"):
        from_checkpoint(truncated)


def test_convert_videomt_between_layouts(tmp_path):
    """tools/convert_checkpoint.py: the authors' file -> ours -> their layout again (a
    detectron2 checkpoint, "official" for VidEoMT) and -> a transformers VidEoMT folder."""
    model, _ = tiny()
    authors = save_authors(model.state_dict(), tmp_path / "yt_2019.pth")
    ours = convert(parse_args([str(authors), str(tmp_path / "ours.safetensors"), "--to", "ours"]))
    again = convert(parse_args([str(ours), str(tmp_path / "again.pth"), "--to", "official"]))
    written = torch.load(again)["model"]
    expected = as_authors(model.state_dict())
    assert sorted(written) == sorted(expected)
    assert written["criterion.empty_weight"].tolist() == [1.0] * CLASSES + [pytest.approx(0.1)]
    assert all(torch.equal(written[k], expected[k]) for k in expected if "criterion" not in k)
    folder = convert(parse_args([str(ours), str(tmp_path / "hf"), "--to", "hf"]))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["VideomtForUniversalSegmentation"]
    assert (folder / "video_preprocessor_config.json").is_file()
    for path in (ours, again, folder):
        assert_same_video_outputs(model, from_checkpoint(path).eval())
