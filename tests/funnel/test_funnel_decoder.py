"""FunnelDecoder / FunnelMaskedLM: full-length outputs, and a few optimizer steps lower the MLM loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from effitrans import funnel
from tests.helpers import tiny_model_config


def _mlm(truncate_seq=False, strides=(2, 2), decoder_layers=1, seed=0):
    cfg = tiny_model_config(
        name="encoder_embedding", pooling="mean", embed_dim=8, num_layers=3, attention={"impl": "reference"}
    )
    cfg = funnel.funnel_config(cfg, at_layer=1, stride=2, truncate_seq=truncate_seq, decoder_layers=decoder_layers)
    cfg.funnel.block_layers, cfg.funnel.strides = [1, 1, 1], list(strides)
    return funnel.FunnelMaskedLM(cfg, rngs=nnx.Rngs(params=seed))


@pytest.mark.parametrize("length,truncate_seq", [(16, False), (13, True)])
def test_decoder_returns_full_length(length, truncate_seq):
    model = _mlm(truncate_seq=truncate_seq)
    tokens = jnp.ones((2, length), jnp.int32)
    mask = jnp.ones((2, length), jnp.int32).at[1, length - 3 :].set(0)
    logits = jax.jit(lambda m, t, k: m(t, k))(model, tokens, mask)
    assert logits.shape == (2, length, 61) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_decoder_trains_on_masked_tokens():
    model = _mlm()
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    # A learnable toy language: each row repeats a random 4-token motif, so masked tokens are predictable.
    motifs = rng.integers(5, 61, size=(16, 4))
    tokens = jnp.asarray(np.tile(motifs, (1, 4)), jnp.int32)  # [16, 16]
    mask = jnp.ones_like(tokens)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        inputs, targets, weights = funnel.mask_tokens(key, tokens, mask, mask_id=60, rate=0.2)
        loss_fn = lambda p: funnel.masked_lm_loss(nnx.merge(graphdef, p), inputs, mask, targets, weights)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for i in range(40):
        params, opt, loss = step(params, opt, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
