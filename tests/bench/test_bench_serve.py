"""The serve benchmark runs dense / funnel / TGA at several lengths and reports each variant's FLOPs cut."""

import json
import os

import pytest

from effitrans.bench import serve

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

TINY = f"""
from effitrans.schema import load_config


def get_config(arg=None):
    cfg = load_config({os.path.join(CONFIGS, "encoder_retrieval_small.py")!r})
    m = cfg.model
    m.num_layers, m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_width, m.embed_dim = 3, 32, 2, 2, 16, 48, 8
    m.attention.impl = "reference"
    return cfg
"""


@pytest.mark.slow  # ~20 s: six compiles
def test_serve_bench_lengths_and_flops_bound(tmp_path):
    cfg = tmp_path / "tiny_encoder.py"
    cfg.write_text(TINY)
    path = tmp_path / "serve.json"
    assert (
        serve.main(["--config", str(cfg), "--seq_len", "32,64", "--batch", "2", "--requests", "2", "--json", str(path)])
        == 0
    )
    rows = json.loads(path.read_text())["rows"]
    assert [(r["variant"].split()[0], r["seq_len"]) for r in rows] == [
        ("dense", 32),
        ("funnel", 32),
        ("TGA", 32),
        ("dense", 64),
        ("funnel", 64),
        ("TGA", 64),
    ]
    dense32, funnel32, tga32, dense64, funnel64, _ = rows
    assert dense32["flops_cut_pct"] == 0.0 and dense32["p50_cut_pct"] == 0.0 and tga32["flops_cut_pct"] is None
    # k = 1 of 3 layers at stride 2 (CLS kept apart): the cut is below 2/3 * 1/2 plus attention savings, and
    # grows with length because the pooled layers' attention shrinks 4x.
    assert 25.0 < funnel32["flops_cut_pct"] < funnel64["flops_cut_pct"] < 50.0
    assert funnel64["baseline_p50_ms"] == dense64["p50_ms"]
    assert (tmp_path / "serve.png").stat().st_size > 0


@pytest.mark.parametrize("text", ["0", "128,x", "-4", "128,,256"])
def test_serve_bench_rejects_bad_lengths(text):
    with pytest.raises(ValueError, match="--seq_len"):
        serve.parse_lengths(text)
