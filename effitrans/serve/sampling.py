"""Next-token sampling, the one sampler of `generate`, `decode_tokens`, the serving engine and the benchmarks.

Order (as HF transformers): temperature, then top-k, then top-p (nucleus: the smallest set of most likely
tokens whose probability reaches p), then a categorical draw. temperature 0 is greedy; top_k 0 and
top_p 1.0 switch those filters off. Parameters are scalars or per-row [B] arrays, so one batch can mix
greedy and sampled requests. Stop tokens: `apply_stop_tokens` pads every token a row emits after its stop
token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

ArrayOr = jax.Array | float | int


def is_int(value) -> bool:
    """True for a Python or numpy integer; bools are not token ids or counts."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for a Python or numpy integer or float (bools excluded); it may still be inf or NaN."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_sampling(temperature, top_k, top_p, vocab_size: int) -> str | None:
    """None if the parameters are allowed, else a message naming the bad one and the allowed range."""
    if not is_real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
        return f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)"
    if not is_int(top_k) or not 0 <= top_k <= vocab_size:
        return f"top_k={top_k!r} must be an int in [0, vocab_size={vocab_size}] (0 means no top-k filter)"
    if not is_real(top_p) or not 0 < top_p <= 1:
        return f"top_p={top_p!r} must be a number in (0, 1] (1 means no nucleus filter)"
    return None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How `generate` / `decode_tokens` pick each token: temperature 0 is greedy; top_k None and top_p 1.0
    switch those filters off; after a row emits one of stop_tokens, its later tokens are pad_id."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    stop_tokens: Sequence[int] = ()
    pad_id: int = 0

    def __post_init__(self):
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 1, or None for no top-k filter")
        problem = check_sampling(self.temperature, 0, self.top_p, 0)  # temperature and top_p
        if problem:
            raise ValueError(problem)
        stop = np.asarray(self.stop_tokens)
        if stop.ndim != 1 or (stop.size and stop.dtype.kind not in "iu"):
            raise ValueError(f"stop_tokens={self.stop_tokens!r} must be a sequence of int token ids")
        if not is_int(self.pad_id):
            raise ValueError(f"pad_id={self.pad_id!r} must be an int token id")
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _static(value, off) -> bool:
    """True when `value` is a Python number equal to `off` (known when tracing, so its work can be skipped)."""
    return isinstance(value, (int, float)) and value == off


def sample_tokens(
    logits: jax.Array, rng: jax.Array | None, *, temperature: ArrayOr = 0.0, top_k: ArrayOr = 0, top_p: ArrayOr = 1.0
) -> jax.Array:
    """logits [B, V] -> token ids int32 [B]; temperature, top_k, top_p are scalars or per-row [B] arrays.

    A Python temperature 0 is greedy without a draw (rng may be None); Python top_k 0 with top_p 1.0 draws
    without sorting the vocabulary.
    """
    b, v = logits.shape
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    if _static(temperature, 0):
        return greedy
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]  # [B, V]
    if _static(top_k, 0) and _static(top_p, 1):
        sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)  # [B]
        return jnp.where(temperature > 0, sampled, greedy)
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (b,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
    sorted_logits, order = jax.lax.top_k(scaled, v)  # [B, V] descending
    rank = jnp.arange(v, dtype=jnp.int32)[None, :]  # [1, V]
    keep = rank < jnp.where(top_k > 0, top_k, v)[:, None]  # top-k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)  # [B, V]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative
    keep &= mass_before < top_p[:, None]  # nucleus; rank 0 always kept
    choice = jax.random.categorical(rng, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)  # [B]
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def apply_stop_tokens(
    tokens: jax.Array, done: jax.Array, stop_tokens: jax.Array, pad_id: ArrayOr
) -> tuple[jax.Array, jax.Array]:
    """tokens int [B] just sampled, done bool [B] (the row already emitted a stop token), stop_tokens int [S]
    -> (tokens with finished rows set to pad_id, done including rows that emitted a stop token now).
    The stop token itself is kept; S = 0 returns the tokens unchanged."""
    if stop_tokens.shape[0] == 0:
        return tokens, done
    out = jnp.where(done, jnp.asarray(pad_id, tokens.dtype), tokens)  # [B]
    return out, done | jnp.isin(out, stop_tokens)
