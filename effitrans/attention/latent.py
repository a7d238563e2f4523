"""Multi-head Latent Attention (MLA; DeepSeek-V2, arXiv:2405.04434, and DeepSeek-V3).

Keys and values of all heads are reconstructed from one compressed latent c = RMSNorm(x W_dkv) of width C
(kv_lora_rank) per token, plus one RoPE key shared by every head (decoupled RoPE). The KV cache therefore
holds only [latent | rope key], C + R numbers per token and layer, whatever the number of heads.

Per head n, with H = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim:
    q_n = [q_nope_n | RoPE(q_rope_n)]                       from x (or from RMSNorm(x W_dq) when q_lora_rank)
    k_n = [c W_uk_n | RoPE(k_rope)],  v_n = c W_uv_n         k_rope shared by all heads
    y   = sum_n softmax(q_n k_n^T * scale) v_n W_o_n

Two paths compute the same function:
  naive     expands k_n, v_n per head ([B, S, N, H+R] and [B, S, N, V]) and runs ordinary attention; the
            cheaper way for training and long prefill (no C-wide dot products).
  absorbed  folds W_uk into the query (q_nope_n W_uk_n^T is [C]) and W_uv into the output, so attention
            runs directly over the cached latent as multi-query attention with one kv head of width
            C + R; decode then reads C + R numbers per cached token instead of N (H + R + V).
  auto      naive without a cache, absorbed when decoding (decode=True).

YaRN (Peng et al., 2023) as DeepSeek-V3 uses it: the RoPE frequencies are blended between interpolation
and extrapolation by wavelength, and the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2.

Einsum letters (DESIGN.md plus): C latent width, R rope head dim, V value head dim, L query low rank.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from effitrans import kernels
from effitrans.attention.base import AttentionBase
from effitrans.attention.cache import write_at_lengths
from effitrans.layers.norms import rms_norm
from effitrans.layers.params import fan_in_normal, init_param
from effitrans.layers.rope import ROPE_LAYOUTS, apply_rope

MLA_PATHS = ("naive", "absorbed", "auto")


# ---- the cache ---------------------------------------------------------------------------------------


@struct.dataclass
class LatentCache:
    """What MLA caches per token: the normalised latent and the rotated shared rope key.

    kv: [B, L, C + R] = [latent c (C) | RoPE(k_rope) (R)]; L = allocated max length.
    lengths: int32 [B], tokens of row b in the cache; slots >= lengths[b] are unwritten.
    """

    kv: jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_lora_rank: int, rope_head_dim: int, dtype=jnp.float32) -> LatentCache:
        return cls(
            kv=jnp.zeros((batch, max_len, kv_lora_rank + rope_head_dim), dtype), lengths=jnp.zeros((batch,), jnp.int32)
        )

    @property
    def max_len(self) -> int:
        return self.kv.shape[1]

    def append(self, kv_new: jax.Array) -> LatentCache:
        """Writes kv_new [B, T, C + R] at each row's current length; returns the updated cache."""
        return LatentCache(kv=write_at_lengths(self.kv, kv_new, self.lengths), lengths=self.lengths + kv_new.shape[1])


# ---- YaRN and RoPE with explicit frequencies ----------------------------------------------------------


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature term: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(dim: int, base: float) -> np.ndarray:
    """Plain RoPE inverse frequencies [dim/2] base^(-2i/dim), on the host (usable under jit/eval_shape)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even dimension, got {dim}")
    return (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(np.float32)


_get_mscale = yarn_mscale  # LatentAttention.__init__ has an argument of the same name


def yarn_frequencies(
    dim: int, base: float, factor: float, original_max_len: int, beta_fast: float = 32.0, beta_slow: float = 1.0
) -> np.ndarray:
    """YaRN inverse frequencies [dim/2]: extrapolated (plain RoPE) for wavelengths that rotate more than
    beta_fast times over the original context, interpolated (divided by factor) below beta_slow, a
    linear ramp between (the "NTK-by-parts" rule, as in DeepSeek-V3 / HF transformers)."""

    def correction_dim(num_rotations):
        return dim * math.log(original_max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)  # [dim/2]
    extrapolation = rope_inv_freq(dim, base)  # [dim/2]
    interpolation = extrapolation / factor
    keep = 1.0 - ramp  # 1: extrapolate
    return (interpolation * (1.0 - keep) + extrapolation * keep).astype(np.float32)


def rotate(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, layout: str) -> jax.Array:
    """RoPE of x [B, T, N, R] at positions [B, T] with given inverse frequencies [R/2]; returns x.dtype."""
    return apply_rope(x, positions, layout=layout, inv_freq=inv_freq)


# ---- the module --------------------------------------------------------------------------------------


class LatentAttention(AttentionBase, kind="latent", cross_attention=True, decodes=True):
    """MLA with the shared attention protocol (`__call__`, `init_cache`).

    Weights: wq [D, N, H+R] (or wq_a [D, L], q_norm [L], wq_b [L, N, H+R] with q_lora_rank=L),
    wkv_a [D, C+R], kv_norm [C], wk_b [C, N, H], wv_b [C, N, V], wo [N, V, D].
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        causal: bool = True,
        path: str = "auto",
        impl: str = "auto",
        rope_base: float = 10000.0,
        rope_layout: str = "half",
        yarn_factor: float | None = None,
        yarn_original_max_len: int = 4096,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_mscale: float = 1.0,
        yarn_mscale_all_dim: float = 0.0,
        norm_eps: float = 1e-6,
        block_q: int | None = None,
        block_k: int | None = None,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        for name, v in (
            ("kv_lora_rank", kv_lora_rank),
            ("qk_nope_head_dim", qk_nope_head_dim),
            ("qk_rope_head_dim", qk_rope_head_dim),
            ("v_head_dim", v_head_dim),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if q_lora_rank is not None and (not isinstance(q_lora_rank, int) or q_lora_rank < 1):
            raise ValueError(f"q_lora_rank={q_lora_rank!r} must be None (no query compression) or an int >= 1")
        if path not in MLA_PATHS:
            raise ValueError(f"path={path!r} is not one of {MLA_PATHS}")
        if rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout={rope_layout!r} is not one of {ROPE_LAYOUTS}")
        if yarn_factor is not None and yarn_factor < 1.0:
            raise ValueError(f"yarn_factor={yarn_factor} must be None (no YaRN) or >= 1")
        self.num_heads, self.kv_lora_rank, self.q_lora_rank = num_heads, kv_lora_rank, q_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.causal, self.path, self.impl = causal, path, impl
        self.rope_layout, self.norm_eps = rope_layout, norm_eps
        self.block_q, self.block_k, self.dtype = block_q, block_k, dtype

        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = qk_dim**-0.5
        rope_gain = 1.0
        # Inverse frequencies [R/2] as a static tuple (not a Variable: they are not trained or checkpointed).
        if yarn_factor is None:
            inv_freq = rope_inv_freq(qk_rope_head_dim, rope_base)
        else:
            inv_freq = yarn_frequencies(
                qk_rope_head_dim, rope_base, yarn_factor, yarn_original_max_len, yarn_beta_fast, yarn_beta_slow
            )
        self.inv_freq = tuple(float(f) for f in inv_freq)
        if yarn_factor is not None:
            # As DeepSeek-V3 / HF: logits scale by mscale(mscale_all_dim)^2; cos and sin (the rope parts of q
            # and k) by mscale(mscale) / mscale(mscale_all_dim), or by mscale(factor) when either is 0.
            if yarn_mscale_all_dim:
                self.scale *= _get_mscale(yarn_factor, yarn_mscale_all_dim) ** 2
            if yarn_mscale and yarn_mscale_all_dim:
                rope_gain = _get_mscale(yarn_factor, yarn_mscale) / _get_mscale(yarn_factor, yarn_mscale_all_dim)
            else:
                rope_gain = _get_mscale(yarn_factor)
        self.rope_gain = rope_gain

        init, n = fan_in_normal((0,)), num_heads
        if q_lora_rank is None:
            self._init_heads(rngs, ("wq",), d_model, n, qk_dim)
        else:
            self.wq_a = init_param(rngs, (d_model, q_lora_rank), ("embed", None), init)
            self.q_norm = init_param(rngs, (q_lora_rank,), (None,), nnx.initializers.ones)
            self.wq_b = init_param(rngs, (q_lora_rank, n, qk_dim), (None, "heads", None), init)
        self.wkv_a = init_param(rngs, (d_model, kv_lora_rank + qk_rope_head_dim), ("embed", None), init)
        self.kv_norm = init_param(rngs, (kv_lora_rank,), (None,), nnx.initializers.ones)
        self.wk_b = init_param(rngs, (kv_lora_rank, n, qk_nope_head_dim), (None, "heads", None), init)
        self.wv_b = init_param(rngs, (kv_lora_rank, n, v_head_dim), (None, "heads", None), init)
        self._init_output(rngs, n, v_head_dim, d_model, "wo")

    # -- pieces -------------------------------------------------------------------------------------

    def _w(self, p):
        return p[...].astype(self.dtype)

    def _rope(self, x, positions):
        y = rotate(x, positions, jnp.asarray(self.inv_freq, jnp.float32), self.rope_layout)
        return y if self.rope_gain == 1.0 else (y.astype(jnp.float32) * self.rope_gain).astype(y.dtype)

    def queries(self, x, positions):
        """x [B, T, D] -> (q_nope [B, T, N, H], q_rope [B, T, N, R] rotated)."""
        if self.q_lora_rank is None:
            q = self._project(x, self.wq)  # [B, T, N, H+R]
        else:
            q_lat = jnp.einsum("BTD,DL->BTL", x, self._w(self.wq_a))  # [B, T, L]
            q_lat = rms_norm(q_lat, self.q_norm[...], self.norm_eps)
            q = jnp.einsum("BTL,LNK->BTNK", q_lat, self._w(self.wq_b))  # [B, T, N, H+R]
        return q[..., : self.nope_dim], self._rope(q[..., self.nope_dim :], positions)

    def latents(self, x, positions):
        """x [B, S, D] -> what the cache stores: [B, S, C + R] = [RMSNorm(latent) | RoPE(k_rope)]."""
        kv = jnp.einsum("BSD,DC->BSC", x, self._w(self.wkv_a))  # [B, S, C+R]
        c = rms_norm(kv[..., : self.kv_lora_rank], self.kv_norm[...], self.norm_eps)  # [B, S, C]
        k_rope = self._rope(kv[..., None, self.kv_lora_rank :], positions)  # [B, S, 1, R]
        return jnp.concatenate([c, k_rope[:, :, 0]], axis=-1)  # [B, S, C+R]

    def _expand(self, kv):
        """Naive path: latents [B, S, C+R] -> per-head k [B, S, N, H+R], v [B, S, N, V]."""
        c, k_rope = kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank :]  # [B, S, C], [B, S, R]
        k_nope = jnp.einsum("BSC,CNH->BSNH", c, self._w(self.wk_b))  # [B, S, N, H]
        v = jnp.einsum("BSC,CNV->BSNV", c, self._w(self.wv_b))  # [B, S, N, V]
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], self.rope_dim))  # [B, S, N, R]
        return jnp.concatenate([k_nope, k_rope], axis=-1), v

    def _absorbed_query(self, q_nope, q_rope):
        """[B, T, N, H], [B, T, N, R] -> q over latents [B, T, N, C+R] (W_uk folded into the query)."""
        q_lat = jnp.einsum("BTNH,CNH->BTNC", q_nope, self._w(self.wk_b))  # [B, T, N, C]
        return jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1)

    def _absorbed_output(self, out_lat):
        """Attention output over latents [B, T, N, C(+R)] -> per-head values [B, T, N, V] (W_uv folded)."""
        return jnp.einsum("BTNC,CNV->BTNV", out_lat[..., : self.kv_lora_rank], self._w(self.wv_b))

    # -- protocol -----------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> LatentCache:
        return LatentCache.zeros(batch, max_len, self.kv_lora_rank, self.rope_dim, dtype=dtype)

    def _forward(self, x, positions, segment_ids, kv_x=None, kv_positions=None):
        """x [B, T, D] (keys/values from kv_x [B, S, D] when given) -> y [B, T, D]."""
        x = x.astype(self.dtype)
        src, src_positions = (x, positions) if kv_x is None else (kv_x.astype(self.dtype), kv_positions)
        q_nope, q_rope = self.queries(x, positions)  # [B, T, N, H], [B, T, N, R]
        kv = self.latents(src, src_positions)  # [B, S, C+R]
        mask = kernels.masks.Causal() if (self.causal and kv_x is None) else kernels.masks.Full()
        kw = dict(
            mask=mask,
            segment_ids=segment_ids,
            scale=self.scale,
            impl=self.impl,
            block_q=self.block_q,
            block_k=self.block_k,
        )
        if self.path == "absorbed":
            q = self._absorbed_query(q_nope, q_rope)  # [B, T, N, C+R]
            out = self._absorbed_output(kernels.attention(q, kv[:, :, None], kv[:, :, None], **kw))  # [B, T, N, V]
        else:
            k, v = self._expand(kv)  # [B, S, N, H+R], [B, S, N, V]
            q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, T, N, H+R]
            out = kernels.attention(q, k, v, **kw)  # [B, T, N, V]
        return self._output(out, "wo")  # [B, T, D]

    def _decode(self, x, positions, cache: LatentCache):
        """The newest T tokens x [B, T, D]: their latents appended to `cache` -> (y [B, T, D], cache)."""
        x = x.astype(self.dtype)
        q_nope, q_rope = self.queries(x, positions)  # [B, T, N, H], [B, T, N, R]
        cache = cache.append(self.latents(x, positions))
        impl = self.impl if self.impl != "pallas" else "auto"
        cached = cache.kv.astype(self.dtype)  # [B, L, C+R]
        if self.path in ("absorbed", "auto"):
            q = self._absorbed_query(q_nope, q_rope)  # [B, T, N, C+R]
            # One kv head; the values are the same array (its first C columns are the latent), so
            # the cache is read once and never copied; the R extra output columns are dropped.
            out_lat = kernels.decode_attention(
                q, cached[:, :, None], cached[:, :, None], lengths=cache.lengths, scale=self.scale, impl=impl
            )
            out = self._absorbed_output(out_lat)  # [B, T, N, V]
        else:
            k, v = self._expand(cached)  # [B, L, N, H+R], [B, L, N, V]
            q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, T, N, H+R]
            out = kernels.decode_attention(q, k, v, lengths=cache.lengths, scale=self.scale, impl=impl)
        return self._output(out, "wo"), cache  # [B, T, D]


def latent_cache_bytes_per_token(kv_lora_rank: int, rope_head_dim: int, num_layers: int, bytes_per: int) -> int:
    """MLA cache formula: (d_c + d_rope) * l elements per token, times the element size."""
    return (kv_lora_rank + rope_head_dim) * num_layers * bytes_per
