"""Per-row sampling: greedy, temperature, top-k, top-p, mixed in one batch; parameter checks."""

import jax
import jax.numpy as jnp
import numpy as np

from effitrans.serve import check_sampling, sample_tokens

PROBS = np.array([0.5, 0.3, 0.15, 0.05], np.float32)


_sample = jax.jit(lambda l, r, t, k, p: sample_tokens(l, r, temperature=t, top_k=k, top_p=p))


def _draws(n=400, temperature=1.0, top_k=0, top_p=1.0):
    """n draws from PROBS; the parameters are traced arrays, so every call reuses one compilation."""
    logits = jnp.log(jnp.broadcast_to(PROBS, (n, 4)))
    full = lambda v, dt: jnp.full((n,), v, dt)
    return np.asarray(
        _sample(
            logits, jax.random.key(0), full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32)
        )
    )


def test_filters_and_mixed_rows():
    assert set(_draws(temperature=1.0).tolist()) == {0, 1, 2, 3}
    assert set(_draws(temperature=1.0, top_k=2).tolist()) == {0, 1}
    assert set(_draws(temperature=1.0, top_p=0.8).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(_draws(temperature=1.0, top_p=0.81).tolist()) == {0, 1, 2}
    assert set(_draws(temperature=1.0, top_p=0.3).tolist()) == {0}
    assert set(_draws(temperature=0.0, top_k=3).tolist()) == {0}  # greedy ignores filters
    d = _draws(temperature=1.0)
    assert abs(np.mean(d == 0) - 0.5) < 0.08  # the draw follows the probs
    # Per-row parameters: row 0 greedy, row 1 top-k 1 (argmax), row 2 unrestricted.
    logits = jnp.log(jnp.broadcast_to(PROBS, (400, 4)))
    t = jnp.tile(jnp.array([0.0, 1.0, 1.0, 1.0]), 100)
    k = jnp.tile(jnp.array([0, 1, 0, 0], jnp.int32), 100)
    p = jnp.tile(jnp.array([1.0, 1.0, 1.0, 0.5]), 100)
    out = np.asarray(_sample(logits, jax.random.key(1), t, k, p)).reshape(100, 4)
    assert set(out[:, 0]) == {0} and set(out[:, 1]) == {0} and set(out[:, 3]) == {0}
    assert len(set(out[:, 2])) > 1


def test_check_sampling_messages():
    assert check_sampling(0.0, 0, 1.0, 10) is None
    assert "temperature=-1" in check_sampling(-1, 0, 1.0, 10)
    assert "top_k=11" in check_sampling(1.0, 11, 1.0, 10)
    assert "top_p=0" in check_sampling(1.0, 0, 0, 10)
