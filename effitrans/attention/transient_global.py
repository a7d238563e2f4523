"""LongT5 Transient Global Attention (Guo et al. 2022, Sec. 3.1.2), as small pure helpers + a thin module.

Per layer, the sequence is cut into fixed blocks of `global_block` tokens; each block's token sum, passed
through RMSNorm, is one "global token", keyed and valued with the same k/v projections as local tokens.
Every token attends, in one softmax, to (a) the keys within `local_radius` of it and (b) all global
tokens. Local logits get a T5 relative-position bias bucket(j - i) (`local_bias`); token-to-global logits
get a separate bias bucket(g - block(i)) (`global_bias`). Cost O(S * (3 * (r + 1) + S / global_block)):
the local part is computed in blocks of r + 1 queries against 3 key blocks (the HF/Flaxformer layout),
the global part as an S x (S / global_block) array; nothing S x S is built.

Conventions (checked against HF `LongT5TransientGlobalAttention`, tests/attention/test_transient_global_hf.py):
- Logits are scaled by 1/sqrt(H) like every effitrans family; T5 folds that scale into W_q instead, so
  porting HF weights multiplies W_q by sqrt(H).
- `segment_ids` is a padding mask (nonzero = token, 0 = padding), like HF's attention_mask; local keys
  must also carry the query's segment id. Padding tokens are left out of the global sums. Global block
  ids follow HF: a token's block is position // global_block; a trailing partial block of real tokens
  ("orphans") is merged into the block before it; rows with fewer than global_block real tokens have no
  global token. Packed sequences (several nonzero segment ids in a row) are not supported by the global part.
- The (padded) sequence length must be a multiple of `global_block` (an error names the key otherwise).
- causal=True (an extension; LongT5 is an encoder): local keys j <= i, and a token sees only global
  tokens of blocks strictly before its own; relative buckets are unidirectional. No decode.
- The model's RoPE is not applied: position information comes from the two relative biases.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.attention.attention_math import masked_softmax_stats, relative_position_bucket
from effitrans.layers.norms import rms_norm
from effitrans.layers.params import fan_in_normal, init_param


def global_block_ids(token_mask: jax.Array, global_block: int):
    """token_mask bool [B, S] -> (block_ids int32 [B, S] (-1 = padding / no block), global_valid bool [B, G]).

    G = S // global_block. Follows HF `_make_global_fixed_block_ids` (orphan tokens join the previous block).
    """
    b, s = token_mask.shape
    pos = jnp.arange(s, dtype=jnp.int32)
    ids = jnp.where(token_mask, pos // global_block, -1)                              # [B, S]
    block_ends = (pos % global_block) == global_block - 1                              # [S]
    full_blocks = jnp.sum(block_ends[None, :] & (ids >= 0), axis=-1, keepdims=True) - 1  # [B, 1]
    ids = jnp.where(ids < full_blocks, ids, full_blocks)                               # orphans -> previous block
    ids = jnp.where(token_mask, ids, -1)
    g = s // global_block
    global_valid = jnp.arange(g, dtype=jnp.int32)[None, :] <= jnp.max(ids, axis=-1, keepdims=True)  # [B, G]
    return ids.astype(jnp.int32), global_valid


def global_aggregates(x: jax.Array, block_ids: jax.Array, num_globals: int) -> jax.Array:
    """x [B, S, D], block_ids [B, S] (-1 = none) -> per-block sums [B, G, D] (float32 accumulation)."""
    seg = jnp.where(block_ids >= 0, block_ids, num_globals)                            # [B, S]
    sums = jax.vmap(lambda xs, ids: jax.ops.segment_sum(xs.astype(jnp.float32), ids,
                                                        num_segments=num_globals + 1))(x, seg)
    return sums[:, :num_globals].astype(x.dtype)                                       # [B, G, D]


def blocks_of(x: jax.Array, block_len: int) -> jax.Array:
    """[B, S, ...] (S a multiple of block_len) -> [B, S / block_len, block_len, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // block_len, block_len, *x.shape[2:])


def three_blocks(x: jax.Array) -> jax.Array:
    """[B, nb, L, ...] -> [B, nb, 3L, ...]: each block with its left and right neighbour (zeros at the ends)."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (1, 1)
    xp = jnp.pad(x, pad)
    nb = x.shape[1]
    return jnp.concatenate([xp[:, :nb], xp[:, 1:nb + 1], xp[:, 2:]], axis=2)


def transient_global_attention(q, k, v, side_k, side_v, *, local_radius: int, token_seg, block_ids,
                               global_valid, local_bias, global_bias, causal: bool, num_buckets: int,
                               max_distance: int, scale: float):
    """The TGA softmax. q, k, v [B, S, N, H]; side_k, side_v [B, G, N, H]; token_seg int [B, S] (0 = pad);
    block_ids [B, S]; global_valid [B, G]; local_bias, global_bias [num_buckets, N]. -> out [B, S, N, H].
    """
    bsz, s, n, h = q.shape
    g = side_k.shape[1]
    bl = local_radius + 1
    sp = -(-s // bl) * bl
    padn = sp - s
    padseq = lambda a: jnp.pad(a, [(0, 0), (0, padn)] + [(0, 0)] * (a.ndim - 2))
    qb = blocks_of(padseq(q), bl)                                                      # [B, nb, L, N, H]
    kb = three_blocks(blocks_of(padseq(k), bl))                                        # [B, nb, 3L, N, H]
    vb = three_blocks(blocks_of(padseq(v), bl))                                        # [B, nb, 3L, N, H]
    nb = sp // bl
    qpos = jnp.arange(sp, dtype=jnp.int32).reshape(nb, bl)                              # [nb, L]
    kpos = (jnp.arange(nb, dtype=jnp.int32)[:, None] - 1) * bl + jnp.arange(3 * bl, dtype=jnp.int32)  # [nb, 3L]
    seg = padseq(token_seg)                                                             # [B, Sp]; pads -> 0
    qseg = blocks_of(seg, bl)                                                           # [B, nb, L]
    kseg = three_blocks(blocks_of(seg, bl))                                             # [B, nb, 3L]
    rel = kpos[:, None, :] - qpos[:, :, None]                                           # [nb, L, 3L]
    local_ok = (jnp.abs(rel) <= local_radius) & (kpos[:, None, :] >= 0) & (kpos[:, None, :] < s)
    if causal:
        local_ok &= rel <= 0
    local_ok = local_ok[None] & (qseg[..., None] == kseg[..., None, :]) & (qseg[..., None] != 0)  # [B, nb, L, 3L]
    bucket = relative_position_bucket(rel, bidirectional=not causal, num_buckets=num_buckets,
                                      max_distance=max_distance)                        # [nb, L, 3L]
    lbias = jnp.take(local_bias.astype(jnp.float32), bucket, axis=0)                   # [nb, L, 3L, N]
    local_logits = jnp.einsum("BcqNH,BckNH->BcNqk", qb, kb,
                              preferred_element_type=jnp.float32) * scale               # [B, nb, N, L, 3L]
    local_logits = local_logits + jnp.moveaxis(lbias, -1, 1)[None]

    bid = padseq(block_ids + 1) - 1                                                     # [B, Sp]; pads -> -1
    side_rel = jnp.arange(g, dtype=jnp.int32)[None, None, :] - bid[..., None]           # [B, Sp, G]
    side_ok = global_valid[:, None, :] & (seg != 0)[..., None]                           # [B, Sp, G]
    if causal:
        side_ok &= side_rel < 0
    sbucket = relative_position_bucket(side_rel, bidirectional=not causal, num_buckets=num_buckets,
                                       max_distance=max_distance)                       # [B, Sp, G]
    sbias = jnp.take(global_bias.astype(jnp.float32), sbucket, axis=0)                 # [B, Sp, G, N]
    side_logits = jnp.einsum("BcqNH,BgNH->BcNqg", qb, side_k,
                             preferred_element_type=jnp.float32) * scale                # [B, nb, N, L, G]
    side_logits = side_logits + jnp.moveaxis(blocks_of(sbias, bl), -1, 2)
    side_ok = blocks_of(side_ok, bl)                                                    # [B, nb, L, G]

    logits = jnp.concatenate([local_logits, side_logits], axis=-1)                      # [B, nb, N, L, 3L+G]
    valid = jnp.concatenate([local_ok, side_ok], axis=-1)[:, :, None]                   # [B, nb, 1, L, 3L+G]
    p, _ = masked_softmax_stats(logits, valid)
    vals = jnp.concatenate([vb, jnp.broadcast_to(side_v[:, None], (bsz, nb, g, n, h))], axis=2)  # [B, nb, 3L+G, N, H]
    out = jnp.einsum("BcNqk,BckNH->BcqNH", p.astype(v.dtype), vals,
                     preferred_element_type=jnp.float32)                                # [B, nb, L, N, H]
    return out.reshape(bsz, sp, n, h)[:, :s].astype(q.dtype)


class TransientGlobalAttention(nnx.Module):
    """LongT5 TGA. Weights: q [D, N, H], k/v [D, N, H], o [N, H, D], global_norm [D],
    local_bias and global_bias [num_buckets, N] (T5 relative-position embeddings)."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, local_radius: int, global_block: int,
                 causal: bool, num_buckets: int = 32, max_distance: int = 128, norm_eps: float = 1e-6,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        if local_radius < 0:
            raise ValueError(f"config.model.attention.local_radius={local_radius} must be >= 0")
        if global_block < 1:
            raise ValueError(f"config.model.attention.global_block={global_block} must be >= 1")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.local_radius, self.global_block, self.causal = local_radius, global_block, causal
        self.num_buckets, self.max_distance, self.norm_eps, self.dtype = num_buckets, max_distance, norm_eps, dtype
        init = fan_in_normal((0,))
        self.q = init_param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", None), init)
        self.k = init_param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", None), init)
        self.v = init_param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", None), init)
        self.o = init_param(rngs, (num_heads, head_dim, d_model), ("heads", None, "embed"), fan_in_normal((0, 1)))
        self.global_norm = init_param(rngs, (d_model,), ("embed",), nnx.initializers.ones)
        bias_init = nnx.initializers.normal(0.02)
        self.local_bias = init_param(rngs, (num_buckets, num_heads), (None, "heads"), bias_init)
        self.global_bias = init_param(rngs, (num_buckets, num_heads), (None, "heads"), bias_init)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        raise ValueError("transient_global attention does not support decode (no cache)")

    def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: Optional[jax.Array] = None,
                 kv_x: Optional[jax.Array] = None, kv_positions: Optional[jax.Array] = None,
                 cache=None, decode: bool = False):
        """x [B, S, D] -> (y [B, S, D], None). positions are unused (relative biases carry position)."""
        del positions, kv_positions
        if kv_x is not None:
            raise ValueError("transient_global attention is self-attention; kv_x is not supported")
        if decode:
            raise ValueError("transient_global attention does not support decode (no cache)")
        b, s, _ = x.shape
        if s % self.global_block:
            raise ValueError(f"config.model.attention.global_block={self.global_block} must divide the padded "
                             f"sequence length {s} (pad sequences to a multiple of global_block)")
        c = lambda p: p[...].astype(self.dtype)
        x = x.astype(self.dtype)
        token_seg = (jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32))
        ids, gvalid = global_block_ids(token_seg != 0, self.global_block)
        num_globals = s // self.global_block
        side = rms_norm(global_aggregates(x, ids, num_globals), self.global_norm[...], self.norm_eps)  # [B, G, D]
        q = jnp.einsum("BSD,DNH->BSNH", x, c(self.q))                                      # [B, S, N, H]
        k = jnp.einsum("BSD,DNH->BSNH", x, c(self.k))
        v = jnp.einsum("BSD,DNH->BSNH", x, c(self.v))
        side_k = jnp.einsum("BGD,DNH->BGNH", side, c(self.k))                              # [B, G, N, H]
        side_v = jnp.einsum("BGD,DNH->BGNH", side, c(self.v))
        out = transient_global_attention(
            q, k, v, side_k, side_v, local_radius=self.local_radius, token_seg=token_seg, block_ids=ids,
            global_valid=gvalid, local_bias=self.local_bias[...], global_bias=self.global_bias[...],
            causal=self.causal, num_buckets=self.num_buckets, max_distance=self.max_distance,
            scale=self.head_dim ** -0.5)                                                   # [B, S, N, H]
        y = jnp.einsum("BSNH,NHD->BSD", out, c(self.o))                                    # [B, S, D]
        return y, None
