"""Our models written in the layouts of other implementations: the official release's state
dict (for VidEoMT, its authors' detectron2 layout) and a transformers model folder."""

import json
from pathlib import Path

from safetensors.torch import save_file

from eomt.modeling.criterion import class_weights
from eomt.weights.layouts import (
    is_eva,
    ours_to_hf,
    ours_to_official,
    ours_to_videomt,
    vit_mlp_is_gated,
)


def is_video(model) -> bool:
    return hasattr(model, "query_updater")  # VidEoMT


def official_state_dict(model, no_object_weight: float = 0.1) -> dict:
    """`model`'s weights as the official release stores them (VidEoMT: as its authors'
    meta-architecture does, which detectron2 saves under "model"), with the loss's class
    weights."""
    convert = ours_to_videomt if is_video(model) else ours_to_official
    state = convert(model.state_dict())
    state["criterion.empty_weight"] = class_weights(model.num_classes, no_object_weight)
    return state


def hf_config(model, categories: list[dict]) -> dict:
    """config.json of the HF model that holds `ours_to_hf(model.state_dict())`."""
    vit = model.backbone
    height, width = vit.patch_embed.img_size
    if height != width:
        raise ValueError(
            f"the Hugging Face EoMT takes square inputs; this model takes {height}x{width}"
        )
    state = vit.state_dict()
    eva = is_eva(state)
    block = vit.blocks[0]
    config = {
        "hidden_size": vit.embed_dim,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": block.attn.num_heads,
        "image_size": height,
        "patch_size": vit.patch_embed.patch_size[0],
        "num_register_tokens": state["reg_token"].shape[1] if "reg_token" in state else 0,
        "layer_norm_eps": vit.norm.eps,
        "hidden_act": "gelu",
        "num_blocks": model.num_query_blocks,
        "num_queries": model.num_queries,
        "num_upscale_blocks": len(model.upscale),
        "id2label": {str(i): c["name"] for i, c in enumerate(categories)},
        "label2id": {c["name"]: i for i, c in enumerate(categories)},
    }
    if is_video(model):
        if eva:
            raise ValueError("transformers' VidEoMT (VideomtForUniversalSegmentation) is DINOv2's")
        config["architectures"] = ["VideomtForUniversalSegmentation"]
    if eva:
        gated = "blocks.0.mlp.fc1_g.weight" in state
        hidden = state["blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
        config.update(
            model_type="eomt_dinov3",
            architectures=["EomtDinov3ForUniversalSegmentation"],
            intermediate_size=hidden,
            use_gated_mlp=gated,
            query_bias="blocks.0.attn.q_bias" in state,
            key_bias=False,
            value_bias="blocks.0.attn.v_bias" in state,
            proj_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        )
    else:
        fc1_rows = state["blocks.0.mlp.fc1.weight"].shape[0]
        swiglu = vit_mlp_is_gated(state)
        # HF derives the SwiGLU width from mlp_ratio 4; DINOv2-g's packed fc1 holds both halves.
        if swiglu and 2 * _hf_swiglu_hidden(vit.embed_dim, 4) != fc1_rows:
            raise ValueError("this SwiGLU hidden size has no Hugging Face EoMT equivalent")
        config.update(
            model_type="videomt" if is_video(model) else "eomt",
            architectures=config.get("architectures", ["EomtForUniversalSegmentation"]),
            use_swiglu_ffn=swiglu,
            mlp_ratio=4 if swiglu else fc1_rows // vit.embed_dim,
        )
    return config


def save_hf(
    model, categories: list[dict], folder: str | Path, no_object_weight: float = 0.1
) -> Path:
    """Write `model` as a transformers model folder: model.safetensors, config.json and the
    image processor's preprocessor_config.json with the model's image statistics (VidEoMT:
    the video processor's video_preprocessor_config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = ours_to_hf(model.state_dict())
    state["criterion.empty_weight"] = class_weights(model.num_classes, no_object_weight)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(model, categories), indent=2))
    processor = {
        "image_processor_type": "EomtImageProcessor",
        "do_rescale": True,
        "do_normalize": True,
        "image_mean": model.pixel_mean.flatten().tolist(),
        "image_std": model.pixel_std.flatten().tolist(),
    }
    name = "preprocessor_config.json"
    if is_video(model):
        del processor["image_processor_type"]
        processor["video_processor_type"] = "VideomtVideoProcessor"
        name = "video_preprocessor_config.json"
    (folder / name).write_text(json.dumps(processor, indent=2))
    return folder / "model.safetensors"


def _hf_swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8
