"""tools/compare_heads.py on a tiny encoder, and the confusion-matrix picture."""

import json

import numpy as np
import pytest

from eomt.config import get_cfg
from eomt.modeling import build_model
from eomt.pictures import draw_confusion_matrix
from eomt.weights.files import save_weights
from tools import compare_heads


def test_confusion_matrix_picture_shades_each_row_by_its_shares():
    matrix = np.array([[3, 1, 0], [0, 0, 0], [0, 2, 2]])
    picture = draw_confusion_matrix(matrix, ["a", "b", "c"], "title", cell=40)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    top, left = 20 + 40, picture.shape[1] - 4 - 3 * 40  # the grid's corner

    def corner(i, j):  # a cell's top-left inner pixel, clear of its number
        return picture[top + i * 40 + 2, left + j * 40 + 2]

    assert corner(0, 0)[0] < corner(2, 1)[0] < corner(0, 1)[0] < corner(0, 2)[0] == 255
    assert tuple(corner(1, 1)) == (255, 255, 255)  # no ground truth: a white row
    assert tuple(corner(2, 1)) == tuple(corner(2, 2))  # 50% and 50%
    with pytest.raises(ValueError, match="shape"):
        draw_confusion_matrix(matrix, ["a", "b"])


def test_every_head_trains_on_the_encoder_and_lands_in_the_table(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    overrides = [
        "model.backbone_kwargs={embed_dim: 32, depth: 4, num_heads: 2}",
        "input.image_size=[64, 64]",
        "model.num_queries=8",
        "model.num_query_blocks=2",
    ]
    cfg = get_cfg(compare_heads.REPO / compare_heads.CONFIG, overrides)
    encoder = save_weights(build_model(cfg), cfg, None, tmp_path / "encoder.safetensors")
    argv = ["--encoder", str(encoder), "--data", str(synthetic_root)]
    argv += ["--output", str(tmp_path / "cmp"), "--iterations", "2", "--latency-iterations", "2"]
    argv += ["--heads", "pmt", "--encoders", "frozen"]
    args = compare_heads.parse_args(argv)
    rows = compare_heads.main(args)
    assert [(r["head"], r["encoder"]) for r in rows] == [("pmt", "frozen")]
    for r in rows:
        assert 0 < r["trainable_params"] < r["params"] and r["gflops"] > 0
        assert r["cpu_ms_per_image"] > 0 and 0 <= r["mIoU"] <= 100
        assert (tmp_path / "cmp" / f"confusion_{r['run']}.png").is_file()
    assert rows[0]["PQ"] is not None and rows[0]["AP"] is not None
    table = capsys.readouterr().out.splitlines()[-3:]
    assert table[0].startswith("| Head | Encoder | Trainable (M)") and table[2].startswith("| pmt")
    record = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert "model.name=pmt" in record["commands"]["pmt_frozen"]
    # A second call reads the finished runs instead of training them again.
    monkeypatch.setattr(compare_heads.subprocess, "run", lambda *a, **k: pytest.fail("retrained"))
    assert [r["mIoU"] for r in compare_heads.main(args)] == [r["mIoU"] for r in rows]
