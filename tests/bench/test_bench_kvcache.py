"""The KV-cache benchmark reproduces the tutorial's DeepSeek-V3 / Llama-3-70B numbers exactly (bf16), and the
caches effitrans allocates have exactly the formula's size."""

import json

from effitrans.bench import kvcache

TUTORIAL = {
    ("deepseek-v3", "mha"): 3_997_696,
    ("deepseek-v3", "mqa"): 31_232,
    ("deepseek-v3", "gqa"): 499_712,
    ("deepseek-v3", "mla"): 70_272,
    ("llama-3-70b", "gqa"): 327_680,
}


def test_formulas_reproduce_the_tutorial_table():
    for (name, design), want in TUTORIAL.items():
        assert kvcache.formula_bytes_per_token(kvcache.CONFIGS[name], design, 2) == want, (name, design)


def test_measured_cache_arrays_equal_the_formula():
    rows = kvcache.rows_for("deepseek-v3", kvcache.CONFIGS["deepseek-v3"])
    rows += kvcache.rows_for("llama-3-70b", kvcache.CONFIGS["llama-3-70b"])
    for r in rows:
        assert r["measured_bytes_per_token"] == r["bytes_per_token"], r
        if (r["config"], r["design"]) in TUTORIAL:
            assert r["measured_bytes_per_token"] == TUTORIAL[r["config"], r["design"]]
            assert r["baseline_bytes_per_token"] == kvcache.formula_bytes_per_token(
                kvcache.CONFIGS[r["config"]], "mha", 2
            )


def test_main_writes_json(tmp_path):
    path = tmp_path / "kv.json"
    assert kvcache.main(["--configs", "smollm2-135m,gemma-3-4b", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert "machine" in payload and len(payload["rows"]) == 9
    sw = [r for r in payload["rows"] if r["design"] == "sliding_window"][0]
    assert (
        sw["bytes_per_token"]
        < [r for r in payload["rows"] if r["config"] == "gemma-3-4b" and r["design"] == "gqa"][0]["bytes_per_token"]
    )
