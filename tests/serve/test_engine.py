"""ServingEngine: continuous batching reproduces greedy decoding; stop tokens; rejections keep the loop serving;
prefix caches; the load generator's statistics."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.registry import build_model
from effitrans.serve import Request, ServingEngine, run_load
from tests.helpers import tiny_model_config

LATENT = {
    "kind": "latent",
    "kv_lora_rank": 12,
    "qk_rope_head_dim": 4,
    "v_head_dim": 6,
    "q_lora_rank": 6,
    "mla_path": "auto",
}  # the shapes of tests/attention/test_latent.py, so a joint run shares compilations


def _greedy_reference(model, prompts, n_new):
    """Greedy continuation by repeated full forward passes (no cache), all prompts right-padded in one batch."""
    width = max(len(p) for p in prompts) + n_new
    seqs = [list(p) for p in prompts]
    fwd = nnx.jit(lambda m, t: m(t)[0])
    for _ in range(n_new):
        toks = jnp.array([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
        logits = np.asarray(fwd(model, toks))
        for s, row in zip(seqs, logits):
            s.append(int(row[len(s) - 1].argmax()))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


@pytest.mark.parametrize(
    "attention",
    [
        LATENT,
        pytest.param({}, marks=pytest.mark.slow),
        pytest.param({"kind": "sliding_window", "window_left": 3, "num_global": 0}, marks=pytest.mark.slow),
    ],
    ids=["latent", "gqa", "window-ring"],
)
def test_continuous_batching_reproduces_greedy_decoding(attention):
    cfg = tiny_model_config(num_layers=1, attention=attention)
    model = build_model(cfg, seed=0)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 8, 7, 6, 5]]
    engine = ServingEngine(model, max_batch=2, max_len=16)  # 4 requests through 2 rows
    results = engine.generate([Request(p, max_new_tokens=6) for p in prompts])
    want = _greedy_reference(model, prompts, 6)
    assert [r.tokens for r in results] == want
    assert all(r.status == "finished" and r.finish_reason == "length" for r in results)
    assert all(0 <= r.ttft <= r.latency for r in results)


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_rejections_stop_tokens_and_prefix_cache_while_serving_others():
    cfg = tiny_model_config(num_layers=1)
    model = build_model(cfg, seed=1)
    engine = ServingEngine(model, max_batch=3, max_len=16)
    good = Request([1, 2, 3, 4], max_new_tokens=5)
    (want,) = _greedy_reference(model, [good.prompt], 5)

    abstract = lambda cfg: nnx.eval_shape(lambda: build_model(cfg))  # init_cache needs no weights
    other = abstract(tiny_model_config(num_layers=1, num_kv_heads=1))  # another config
    latent = abstract(tiny_model_config(num_layers=1, attention=LATENT))  # another family
    # A valid prefix cache: the first 2 prompt tokens, computed by the same model.
    prefix = model.init_cache(1, 16)
    _, prefix = model(jnp.array([[1, 2]]), cache=prefix, decode=True)

    ids = [
        engine.submit(good),
        engine.submit(Request(list(range(12)), max_new_tokens=5)),  # too long
        engine.submit(Request([1, 2], 3, prefix_cache=other.init_cache(1, 16))),  # other config
        engine.submit(Request([1, 2], 3, prefix_cache=latent.init_cache(1, 16))),  # other family
        engine.submit(Request([1, 2], 3, prefix_cache=model.init_cache(1, 8))),  # other max_len
        engine.submit(Request([1, 2], 3, top_p=1.5)),  # bad sampling
        engine.submit(Request([1, 2, 99], 3)),  # bad token id
        engine.submit(Request([1, 2, 3, 4], max_new_tokens=5, prefix_cache=prefix)),  # valid prefix
        engine.submit(Request([1, 2, 3, 4], max_new_tokens=5, stop_tokens=[want[2]])),
    ]  # stops early
    too_big = engine.submit_batch([good] * 4)
    engine.run()
    r = [engine.results[i] for i in ids]
    assert [x.status for x in r] == ["finished"] + ["rejected"] * 6 + ["finished"] * 2
    assert "longer than the cache" in r[1].error and "max_len=16" in r[1].error
    assert "prefix_cache does not fit" in r[2].error and "(1, 16, 1, 8)" in r[2].error
    assert "LatentCache" in r[3].error and "KVCache" in r[3].error
    assert "(1, 8, 2, 8)" in r[4].error
    assert "top_p=1.5" in r[5].error and "vocab_size=61" in r[6].error
    assert r[0].tokens == want and r[7].tokens == want
    assert r[8].tokens == want[: want.index(want[2]) + 1] and r[8].finish_reason == "stop"
    assert all(engine.results[i].status == "rejected" and "max_batch=3" in engine.results[i].error for i in too_big)
    # The loop still serves after all that.
    assert engine.generate([good])[0].tokens == want


def test_load_generator_statistics():
    cfg = tiny_model_config(num_layers=1)
    engine = ServingEngine(build_model(cfg, seed=2), max_batch=3, max_len=16)  # shapes as above: no recompiles
    rng = np.random.default_rng(0)

    def make(i):
        if i == 3:
            return Request([1] * 20, max_new_tokens=4)  # rejected, the rest continue
        return Request(
            rng.integers(0, 61, int(rng.integers(1, 9))).tolist(),
            max_new_tokens=int(rng.integers(2, 8)),
            temperature=0.7,
            top_k=20,
            top_p=0.9,
        )

    stats = run_load(engine, make, num_requests=10, concurrency=3)
    assert stats["finished"] == 9 and stats["rejected"] == 1
    assert stats["qps"] > 0 and stats["tokens_per_s"] > 0
    assert stats["latency_p50_s"] <= stats["latency_p90_s"] <= stats["latency_p99_s"]
    assert stats["ttft_p50_s"] <= stats["latency_p99_s"]
