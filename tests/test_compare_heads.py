"""tools/compare_heads.py on a tiny encoder."""

import json

import pytest

from eomt.config import get_cfg
from eomt.modeling import build_model
from eomt.weights.files import save_weights
from tools import compare_heads


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
    monkeypatch.setattr(compare_heads, "execute", lambda *a, **k: pytest.fail("retrained"))
    assert [r["mIoU"] for r in compare_heads.main(args)] == [r["mIoU"] for r in rows]
