"""The Python code shown in README.md and datasets/README.md runs as written, in a folder that
holds the files it names (small stand-ins: random weights, a synthetic image)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from eomt.config import get_cfg
from eomt.data import SYNTHETIC_CATEGORIES, generate_synthetic_dataset
from eomt.data.synthetic import render_sample
from eomt.modeling import build_model
from eomt.weights.export import official_state_dict, save_hf
from tests.test_weights import tiny_model

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "datasets/README.md")


def python_blocks(document: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / document).read_text(), re.DOTALL)


@pytest.fixture(scope="module")
def named_files(tmp_path_factory):
    """A folder with what the snippets name: the demo's config and checkpoint, an image, an
    official .bin and a Hugging Face folder, the synthetic dataset."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(REPO / "configs")
    cfg = get_cfg("configs/synthetic/eomt_tiny_panoptic.yaml")
    demo = build_model(cfg)
    checkpoint = folder / "output" / "synthetic_tiny_panoptic" / "model_0000600.pth"
    checkpoint.parent.mkdir(parents=True)
    state = {"model": demo.state_dict(), "cfg": OmegaConf.to_container(cfg)}
    torch.save({**state, "categories": SYNTHETIC_CATEGORIES}, checkpoint)
    Image.fromarray(render_sample(np.random.default_rng(0))[0]).save(folder / "image.jpg")
    released, _ = tiny_model()
    torch.save(official_state_dict(released), folder / "pytorch_model.bin")
    save_hf(released, _names(released.num_classes), folder / "hf_folder")
    generate_synthetic_dataset(folder / "datasets" / "synthetic", num_train=2, num_val=1)
    return folder


def _names(count: int) -> list[dict]:
    return [{"id": i, "name": f"class {i}", "isthing": 1, "color": [0, 0, 0]} for i in range(count)]


BLOCKS = [
    (document, index) for document in DOCUMENTS for index in range(len(python_blocks(document)))
]


def test_the_documents_show_python_code():
    assert len(python_blocks("README.md")) >= 2 and python_blocks("datasets/README.md")


@pytest.mark.parametrize("document, index", BLOCKS)
def test_python_block_runs(named_files, monkeypatch, document, index):
    monkeypatch.chdir(named_files)
    code = python_blocks(document)[index]
    exec(compile(code, f"{document}, python block {index + 1}", "exec"), {"__name__": "readme"})
