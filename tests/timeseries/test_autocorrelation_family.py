"""Auto-correlation as an attention family: the same outputs as Autoformer's AutoCorrelation layer with the same
weights, and a ValueError for what it cannot do (causal masks, segment ids, GQA)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.attention import build_attention
from effitrans.layers.series import AutoCorrelation
from tests.helpers import tiny_model_config


def _cfg(**overrides):
    base = dict(num_kv_heads=4, attention=dict(kind="autocorrelation", autocorrelation_factor=2.0))
    return tiny_model_config(**(base | overrides))


@pytest.mark.slow  # eager FFT and gather per shape: ~25 s on a loaded 2-core machine
def test_family_matches_autoformers_layer_with_the_same_weights():
    cfg = _cfg()
    layer = build_attention(cfg, causal=False, rngs=nnx.Rngs(0), dtype=jnp.float32)
    ref = AutoCorrelation(cfg.d_model, cfg.num_heads, cfg.head_dim, factor=2.0, rngs=nnx.Rngs(1))
    for name in ("q", "k", "v", "o"):
        getattr(ref, f"w_{name}")[...] = getattr(layer, name)[...]  # biases stay zero
    rng = np.random.default_rng(0)
    x, mem = (jnp.asarray(rng.normal(size=(2, n, cfg.d_model)), jnp.float32) for n in (24, 30))
    pos = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    y, _ = layer(x, positions=pos)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref(x, x, per_row=True)), atol=1e-4)
    cross, _ = layer(x, positions=pos, kv_x=mem, kv_positions=jnp.zeros((2, 30), jnp.int32))
    np.testing.assert_allclose(np.asarray(cross), np.asarray(ref(x, mem, per_row=True)), atol=1e-4)


def test_what_it_cannot_do_is_a_value_error():
    with pytest.raises(ValueError, match=r"kind='autocorrelation' has no causal form"):
        build_attention(_cfg(), causal=True, rngs=nnx.Rngs(0), dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"num_kv_heads=2 must equal config.model.num_heads=4"):
        build_attention(_cfg(num_kv_heads=2), causal=False, rngs=nnx.Rngs(0), dtype=jnp.float32)
    # shapes only: the check comes before any computation, and drawing real weights compiles per shape
    layer = nnx.eval_shape(lambda: build_attention(_cfg(), causal=False, rngs=nnx.Rngs(0), dtype=jnp.float32))
    x, pos = jnp.zeros((1, 8, 32)), jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"does not support segment_ids"):
        layer(x, positions=pos, segment_ids=jnp.ones((1, 8), jnp.int32))
