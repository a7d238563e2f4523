"""The decode benchmark runs end to end on a tiny model and attaches same-run MHA baselines."""

import json

from effitrans.bench import decode


def test_decode_bench_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(
        decode, "MODEL", dict(d_model=32, num_heads=4, head_dim=8, num_layers=1, ffn_width=32, vocab_size=16)
    )
    monkeypatch.setattr(decode, "MLA", dict(kv_lora_rank=4, qk_rope_head_dim=2))
    path = tmp_path / "decode.json"
    assert (
        decode.main(
            [
                "--contexts",
                "24",
                "--variants",
                "mha,mla_absorbed",
                "--steps",
                "2",
                "--repeats",
                "1",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["mha", "mla_absorbed"]
    mha, mla = rows
    assert mha["speedup_vs_mha"] == 1.0 and mla["baseline_tokens_per_s"] == mha["tokens_per_s"]
    # MHA caches 2 * 4 heads * 8 = 64 floats per token and layer, MLA 4 + 2 = 6.
    assert mha["cache_bytes"] == 64 * 4 * 26 + 4 and mla["cache_bytes"] == 6 * 4 * 26 + 4
    assert abs(mla["cache_x_smaller"] - mha["cache_bytes"] / mla["cache_bytes"]) < 1e-9
