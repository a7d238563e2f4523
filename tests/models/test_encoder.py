import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effitrans.registry import build_model
from tests.helpers import tiny_model_config


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_encoder_ignores_padding_and_is_bidirectional():
    for pooling in ("cls", "mean"):
        cfg = tiny_model_config(name="encoder_classifier", pooling=pooling, num_classes=3)
        model = build_model(cfg)
        tokens = jnp.array([[5, 6, 7, 8, 0, 0]])
        mask = jnp.array([[1, 1, 1, 1, 0, 0]])
        out = model(tokens, mask)
        garbage = tokens.at[0, 4:].set(jnp.array([40, 41]))
        np.testing.assert_allclose(model(garbage, mask), out, atol=1e-5)  # padding is invisible
        shorter = model(tokens[:, :4], mask[:, :4])
        np.testing.assert_allclose(shorter, out, atol=1e-5)
        changed_last = model(tokens.at[0, 3].set(9), mask)
        assert not np.allclose(changed_last, out)  # CLS sees later tokens
        assert out.shape == (1, 3)


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_embedding_encoder_unit_norm():
    cfg = tiny_model_config(name="encoder_embedding", pooling="mean", embed_dim=12)
    model = build_model(cfg)
    e = model(jax.random.randint(jax.random.key(0), (3, 7), 0, 61), jnp.ones((3, 7)))
    assert e.shape == (3, 12)
    np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
