import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effitrans.registry import build_model
from effitrans.serve import generate
from tests.helpers import tiny_model_config


@pytest.mark.parametrize(
    "num_kv_heads,impl",
    [
        pytest.param(4, "reference", marks=pytest.mark.slow),
        pytest.param(2, "reference", marks=pytest.mark.slow),  # ~17 s; generate tests cover decode by default
        pytest.param(1, "reference", marks=pytest.mark.slow),
        pytest.param(2, "xla", marks=pytest.mark.slow),
    ],
    ids=["MHA", "GQA", "MQA", "GQA-xla"],
)
def test_cached_decode_reproduces_full_forward_logits(num_kv_heads, impl):
    cfg = tiny_model_config(num_kv_heads=num_kv_heads, attention={"impl": impl})
    model = build_model(cfg, seed=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, cfg.vocab_size)
    full, _ = model(tokens)  # [B, T, V]

    # Prefill 4 tokens, then feed the rest one at a time through the cache.
    cache = model.init_cache(2, 16)
    logits, cache = model(tokens[:, :4], cache=cache, decode=True)
    pieces = [logits]
    for t in range(4, 11):
        logits, cache = model(tokens[:, t : t + 1], cache=cache, decode=True)
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache[0].lengths, [11, 11])


@pytest.mark.slow  # ~10 s; tests/serve/test_generate.py keeps greedy decoding == full forward in the default run
def test_generate_matches_full_forward_token_by_token():
    cfg = tiny_model_config(num_kv_heads=1)
    model = build_model(cfg, seed=2)
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    tokens, step_logits = generate(model, prompt, max_new_tokens=6, return_logits=True)
    assert tokens.shape == (2, 11)
    full, _ = model(tokens)
    # The logits that produced new token j are the full forward's logits at position 4 + j.
    np.testing.assert_allclose(step_logits, full[:, 4:10], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(tokens[:, 5:], jnp.argmax(full[:, 4:10], -1))


def test_generate_sampling_respects_top_k():
    cfg = tiny_model_config()
    model = build_model(cfg, seed=3)
    prompt = jnp.zeros((4, 3), jnp.int32)
    tokens, logits = generate(
        model, prompt, max_new_tokens=5, temperature=1.0, top_k=2, rng=jax.random.key(7), return_logits=True
    )
    top2 = jax.lax.top_k(logits, 2)[1]  # [B, n, 2]
    assert bool(jnp.all(jnp.any(tokens[:, 3:, None] == top2, axis=-1)))
    with pytest.raises(ValueError, match="top_k=0"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0, top_k=0)


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_per_layer_ffn_widths_and_untied_head():
    cfg = tiny_model_config(ffn_width=[16, 40], tie_embeddings=False)
    model = build_model(cfg)
    assert [b.ffn.width for b in model.blocks] == [16, 40]
    logits, _ = model(jnp.zeros((1, 3), jnp.int32))
    assert logits.shape == (1, 3, cfg.vocab_size) and logits.dtype == jnp.float32


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_bfloat16_compute_keeps_float32_params():
    cfg = tiny_model_config(dtype="bfloat16")
    model = build_model(cfg)
    assert model.blocks[0].attn.q[...].dtype == jnp.float32
    logits, _ = model(jnp.zeros((1, 4), jnp.int32))
    full32, _ = build_model(tiny_model_config())(jnp.zeros((1, 4), jnp.int32))
    np.testing.assert_allclose(logits, full32, atol=5e-2)


def test_causality():
    cfg = tiny_model_config()
    model = build_model(cfg)
    a = jnp.array([[1, 2, 3, 4, 5]])
    b = a.at[0, 4].set(9)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_allclose(la[:, :4], lb[:, :4], atol=1e-6)
