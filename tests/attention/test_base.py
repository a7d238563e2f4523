"""The shared protocol guards of AttentionBase: every registered family names itself by its config kind and
rejects the protocol arguments it does not support (kv_x, decode) with a ValueError naming the argument."""

import jax.numpy as jnp
import pytest
from flax import nnx

from effitrans.attention import ATTENTION_FAMILIES, build_attention
from effitrans.attention.base import AttentionBase
from tests.helpers import tiny_model_config

EXTRA = {"latent": dict(kv_lora_rank=8, qk_rope_head_dim=4)}


@pytest.mark.parametrize("kind", sorted(ATTENTION_FAMILIES))
def test_family_guards_name_the_argument(kind):
    cfg = tiny_model_config(num_kv_heads=4, attention=dict(kind=kind, **EXTRA.get(kind, {})))
    causal = ATTENTION_FAMILIES[kind].supports_causal  # causal where the family has a causal form
    layer = build_attention(cfg, causal=causal, rngs=nnx.Rngs(0), dtype=jnp.float32)
    assert isinstance(layer, AttentionBase) and layer.kind == kind
    x = jnp.zeros((1, 16, cfg.d_model), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (1, 16))
    if layer.cross_attention:
        with pytest.raises(ValueError, match="kv_positions"):
            layer(x, positions=pos, kv_x=x)
    else:
        with pytest.raises(ValueError, match=f"{kind} attention is self-attention; kv_x"):
            layer(x, positions=pos, kv_x=x, kv_positions=pos)
    if layer.decodes:
        with pytest.raises(ValueError, match="needs a cache"):
            layer(x, positions=pos, decode=True)
        if layer.cross_attention:
            with pytest.raises(ValueError, match="decode=True with kv_x"):
                layer(x, positions=pos, kv_x=x, kv_positions=pos, cache=layer.init_cache(1, 32), decode=True)
    else:
        for call in (lambda: layer(x, positions=pos, decode=True), lambda: layer.init_cache(1, 32)):
            with pytest.raises(ValueError, match=f"{kind} attention does not support decode"):
                call()
