"""Autoregressive generation with a KV cache: one jitted prefill of the prompt, then `decode_tokens`, one
jitted lax.scan of decode steps from a filled cache.

Both jitted functions live at module level with the model's graphdef static (its hash computed once), so
a compilation is cached per (model structure, batch, prompt length, cache length, steps, cache dtype, greedy
or sampled, logits returned or not, number of stop tokens) and reused by every later call, for this model or
any other of the same structure; weights, prompts, the rng and the sampling values are traced arguments.
Sampling is `sampling.sample_tokens` (greedy when temperature is 0).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effitrans.serve.sampling import Sampling, apply_stop_tokens, sample_tokens

GREEDY = Sampling()


def split_model(model) -> tuple:
    """model: an nnx.Module, or its `nnx.split(model)` pair (hot loops split once) -> (graphdef, state)."""
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    if isinstance(model, tuple) and len(model) == 2 and isinstance(model[0], nnx.GraphDef):
        return model
    raise TypeError(f"model must be an nnx.Module or its nnx.split (graphdef, state) pair, got {type(model).__name__}")


class _Structure:
    """A graphdef as a static jit argument: hashing an nnx.GraphDef walks the whole graph (~0.1-0.5 ms), so the
    hash is computed once per graphdef object (see `_structure`)."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Structure) and (
            self.graphdef is other.graphdef or (self._hash == other._hash and self.graphdef == other.graphdef)
        )


_STRUCTURES: dict[int, _Structure] = {}  # id(graphdef) -> its _Structure (which keeps that graphdef alive)


def _structure(graphdef) -> _Structure:
    key = _STRUCTURES.get(id(graphdef))
    if key is None or key.graphdef is not graphdef:
        if len(_STRUCTURES) >= 32:  # generate() on modules splits afresh each call: keep only recent ones
            del _STRUCTURES[next(iter(_STRUCTURES))]
        key = _STRUCTURES[id(graphdef)] = _Structure(graphdef)
    return key


@functools.partial(jax.jit, static_argnames=("structure",))
def _one_token_logits(structure, state):
    return nnx.merge(structure.graphdef, state)(jnp.zeros((1, 1), jnp.int32))[0]  # [1, 1, V]


def vocab_size(graphdef, state) -> int:
    """The model's vocabulary size, from the shape of its logits (traced once per structure, never run)."""
    return int(_one_token_logits.eval_shape(_structure(graphdef), state).shape[-1])


def _sampling_args(sampling: Sampling, graphdef, state) -> dict:
    """`sampling` as the jitted steps take it, after checking top_k against the model's vocabulary."""
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a serve.Sampling, got {type(sampling).__name__}")
    if sampling.top_k is not None and sampling.top_k > (vocab := vocab_size(graphdef, state)):
        raise ValueError(f"top_k={sampling.top_k} must be in [1, vocab_size={vocab}] or None for no top-k filter")
    return _jit_args(sampling)


@functools.lru_cache(maxsize=64)
def _jit_args(sampling: Sampling) -> dict:
    """Converted once per Sampling value (decode benchmarks call decode_tokens in a timed loop)."""
    params = (float(sampling.temperature), sampling.top_k or 0, float(sampling.top_p))
    return {
        "params": None if sampling.greedy else params,
        "stop_tokens": np.asarray(sampling.stop_tokens, np.int32).reshape(-1),
        "pad_id": int(sampling.pad_id),
    }


def _sample(logits, rng, params):
    """The one sampler; params None is greedy (no draw), else (temperature, top_k, top_p) traced scalars."""
    if params is None:
        return sample_tokens(logits, None)
    temperature, top_k, top_p = params
    return sample_tokens(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=("structure", "max_len", "cache_dtype"))
def _prefill(structure, state, prompt, rng, params, *, max_len, cache_dtype):
    """prompt [B, T0] -> (first token [B], its logits [B, V], a cache of max_len holding the prompt)."""
    model = nnx.merge(structure.graphdef, state)
    cache = model.init_cache(prompt.shape[0], max_len, cache_dtype)
    logits, cache = model(prompt, cache=cache, decode=True)  # [B, T0, V]
    last = logits[:, -1]  # [B, V]
    return _sample(last, rng, params), last, cache


@functools.partial(jax.jit, static_argnames=("structure", "steps", "return_logits"), donate_argnames=("cache",))
def _decode(structure, state, cache, token, rng, params, stop_tokens, pad_id, *, steps, return_logits):
    """token [B] (not yet in the cache) -> (tokens [B, steps], logits [B, steps, V] or None, cache)."""
    model = nnx.merge(structure.graphdef, state)
    done = jnp.isin(token, stop_tokens)  # [B] rows already finished

    def step(carry, r):
        tok, done, cache = carry
        logits, cache = model(tok[:, None], cache=cache, decode=True)  # [B, 1, V]
        nxt, done = apply_stop_tokens(_sample(logits[:, 0], r, params), done, stop_tokens, pad_id)
        return (nxt, done, cache), (nxt, logits[:, 0] if return_logits else None)

    rngs = None if params is None else jax.random.split(rng, steps)
    (_, _, cache), (tokens, logits) = jax.lax.scan(step, (token, done, cache), rngs, length=steps)
    return tokens.T, None if logits is None else logits.transpose(1, 0, 2), cache


def decode_tokens(
    model,
    cache,
    token: jax.Array,
    *,
    steps: int,
    sampling: Sampling = GREEDY,
    rng: jax.Array | None = None,
    return_logits: bool = False,
):
    """Decodes `steps` tokens from a filled cache in one jitted lax.scan.

    model: an nnx.Module or its nnx.split pair; cache: the model's cache (donated: use the returned one);
    token int [B]: each row's last token, not yet in the cache; sampling: a `Sampling` (default greedy).
    A row whose token is a stop token is finished; every token after a row's stop token is pad_id.
    Returns (tokens int32 [B, steps], cache), with the logits [B, steps, V] each token was sampled from
    between them when return_logits.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    if not (isinstance(token, jax.Array) and token.dtype == jnp.int32):
        token = jnp.asarray(token, jnp.int32)
    if token.ndim != 1:
        raise ValueError(f"token must be int [batch], got shape {token.shape}")
    graphdef, state = split_model(model)
    args = _sampling_args(sampling, graphdef, state)
    rng = None if args["params"] is None else jax.random.key(0) if rng is None else rng  # greedy: no draw
    tokens, logits, cache = _decode(
        _structure(graphdef), state, cache, token, rng, **args, steps=steps, return_logits=return_logits
    )
    return (tokens, logits, cache) if return_logits else (tokens, cache)


def generate(
    model,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    rng: jax.Array | None = None,
    cache_dtype=jnp.float32,
    return_logits: bool = False,
):
    """prompt int [B, T0] -> tokens [B, T0 + max_new_tokens] (and the logits [B, max_new_tokens, V]
    each new token was sampled from, when return_logits).

    model: an nnx.Module or its nnx.split pair. temperature 0 is greedy; top_k None and top_p 1.0 switch
    those filters off. After a row emits one of stop_tokens, its remaining new tokens are pad_id.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int [batch, length >= 1], got shape {prompt.shape}")
    graphdef, state = split_model(model)
    sampling = Sampling(temperature, top_k, top_p, stop_tokens, pad_id)
    params = _sampling_args(sampling, graphdef, state)["params"]
    first_rng = None
    if params is not None:  # greedy draws nothing
        first_rng, rng = jax.random.split(jax.random.key(0) if rng is None else rng)
    first, first_logits, cache = _prefill(
        _structure(graphdef),
        state,
        prompt,
        first_rng,
        params,
        max_len=prompt.shape[1] + max_new_tokens,
        cache_dtype=cache_dtype,
    )
    new, logits = first[:, None], first_logits[:, None]  # [B, 1], [B, 1, V]
    if max_new_tokens > 1:
        rest = decode_tokens(
            (graphdef, state),
            cache,
            first,
            steps=max_new_tokens - 1,
            sampling=sampling,
            rng=rng,
            return_logits=return_logits,
        )
        new = jnp.concatenate([new, rest[0]], axis=1)  # [B, max_new_tokens]
        if return_logits:
            logits = jnp.concatenate([logits, rest[1]], axis=1)  # [B, max_new_tokens, V]
    tokens = jnp.concatenate([prompt, new], axis=1)
    return (tokens, logits) if return_logits else tokens
