"""Autoregressive generation with a KV cache: one prefill of the prompt, then one token per decode step.

The whole loop is one jitted function (prefill + lax.scan over decode steps), so a generation costs one
compilation per (batch, prompt length, new tokens) shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def sample_next_token(
    logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0, top_k: int | None = None
) -> jax.Array:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy; top_k keeps the k most likely tokens."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and not (1 <= top_k <= logits.shape[-1]):
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={logits.shape[-1]}] or None")
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
    model: nnx.Module,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    cache_dtype=jnp.float32,
    return_logits: bool = False,
):
    """prompt int [B, T0] -> tokens [B, T0 + max_new_tokens] (and the logits [B, max_new_tokens, V]
    each new token was sampled from, when return_logits)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int [batch, length >= 1], got shape {prompt.shape}")
    rng = jax.random.key(0) if rng is None else rng
    batch, prompt_len = prompt.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, prompt, rng):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(batch, prompt_len + max_new_tokens, cache_dtype)
        logits, cache = m(prompt, cache=cache, decode=True)  # prefill: [B, T0, V]
        first_logits = logits[:, -1]  # [B, V]
        rngs = jax.random.split(rng, max_new_tokens)
        first = sample_next_token(first_logits, rngs[0], temperature=temperature, top_k=top_k)

        def step(carry, r):
            token, cache = carry
            logits, cache = m(token[:, None], cache=cache, decode=True)  # [B, 1, V]
            nxt = sample_next_token(logits[:, 0], r, temperature=temperature, top_k=top_k)
            return (nxt, cache), (nxt, logits[:, 0])

        _, (tokens, step_logits) = jax.lax.scan(step, (first, cache), rngs[1:])  # [n-1, B], [n-1, B, V]
        new_tokens = jnp.concatenate([first[None], tokens], axis=0).T  # [B, n]
        all_logits = jnp.concatenate([first_logits[None], step_logits], axis=0).transpose(1, 0, 2)
        return jnp.concatenate([prompt, new_tokens], axis=1), all_logits

    tokens, logits = run(state, prompt, rng)
    return (tokens, logits) if return_logits else tokens
