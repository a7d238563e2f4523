"""An effitrans NNX block dropped into a Flax Linen model through flax.nnx.bridge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.nnx import bridge

from effitrans.models.transformer import Block
from tests.helpers import tiny_model_config


class LinenModel(nn.Module):
    """A Linen network whose middle layer is an effitrans Block."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32)(x)
        block = bridge.to_linen(Block, tiny_model_config(), 48, causal=True)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        x, _ = block(x, positions=positions)
        return nn.Dense(5)(x)


@pytest.mark.slow  # > 10 s on 2 cores; CI runs it
def test_block_inside_linen_module_trains():
    model = LinenModel()
    x = jax.random.normal(jax.random.key(0), (2, 6, 7))
    variables = model.init(jax.random.key(1), x)
    y = model.apply(variables, x)
    assert y.shape == (2, 6, 5)
    names = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(variables)[0][0][0])
    assert "params" in names

    def loss(v):
        return jnp.mean(model.apply(v, x) ** 2)

    grads = jax.grad(loss)(variables)
    # The effitrans block's attention weights receive gradients through Linen.
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    attn = [g for k, g in flat.items() if "attn" in k]
    assert attn and all(np.isfinite(np.asarray(g)).all() for g in attn)
    assert any(float(jnp.abs(g).sum()) > 0 for g in attn)
