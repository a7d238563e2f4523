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

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.attention.attention_math import masked_softmax_stats, relative_position_bucket
from effitrans.attention.base import AttentionBase
from effitrans.layers.norms import rms_norm
from effitrans.layers.params import init_param


def global_block_ids(token_mask: jax.Array, global_block: int):
    """token_mask bool [B, S] -> (block_ids int32 [B, S] (-1 = padding / no block), global_valid bool [B, G]).

    G = S // global_block. Follows HF `_make_global_fixed_block_ids` (orphan tokens join the previous block).
    """
    b, s = token_mask.shape
    pos = jnp.arange(s, dtype=jnp.int32)
    ids = jnp.where(token_mask, pos // global_block, -1)  # [B, S]
    block_ends = (pos % global_block) == global_block - 1  # [S]
    full_blocks = jnp.sum(block_ends[None, :] & (ids >= 0), axis=-1, keepdims=True) - 1  # [B, 1]
    ids = jnp.where(ids < full_blocks, ids, full_blocks)  # orphans -> previous block
    ids = jnp.where(token_mask, ids, -1)
    g = s // global_block
    global_valid = jnp.arange(g, dtype=jnp.int32)[None, :] <= jnp.max(ids, axis=-1, keepdims=True)  # [B, G]
    return ids.astype(jnp.int32), global_valid


def global_aggregates(x: jax.Array, block_ids: jax.Array, num_globals: int) -> jax.Array:
    """x [B, S, D], block_ids [B, S] (-1 = none) -> per-block sums [B, G, D] (float32 accumulation)."""
    seg = jnp.where(block_ids >= 0, block_ids, num_globals)  # [B, S]
    sums = jax.vmap(lambda xs, ids: jax.ops.segment_sum(xs.astype(jnp.float32), ids, num_segments=num_globals + 1))(
        x, seg
    )
    return sums[:, :num_globals].astype(x.dtype)  # [B, G, D]


def blocks_of(x: jax.Array, block_len: int) -> jax.Array:
    """[B, S, ...] (S a multiple of block_len) -> [B, S / block_len, block_len, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // block_len, block_len, *x.shape[2:])


def three_blocks(x: jax.Array) -> jax.Array:
    """[B, nb, L, ...] -> [B, nb, 3L, ...]: each block with its left and right neighbour (zeros at the ends)."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (1, 1)
    xp = jnp.pad(x, pad)
    nb = x.shape[1]
    return jnp.concatenate([xp[:, :nb], xp[:, 1 : nb + 1], xp[:, 2:]], axis=2)


def _side_bias(global_bias, block_ids, num_globals: int, *, causal: bool, num_buckets: int, max_distance: int):
    """Token-to-global bias [N, B, S, G]: it depends on (block id of the token, g) only, so the bucketed
    table is built once per (block, g) pair ([N, G + 1, G], row 0 for id -1 = padding) and gathered per token."""
    gq = jnp.arange(-1, num_globals, dtype=jnp.int32)[:, None]  # [G + 1, 1]
    rel = jnp.arange(num_globals, dtype=jnp.int32)[None, :] - gq  # [G + 1, G]
    bucket = relative_position_bucket(rel, bidirectional=not causal, num_buckets=num_buckets, max_distance=max_distance)
    table = jnp.transpose(jnp.take(global_bias.astype(jnp.float32), bucket, axis=0), (2, 0, 1))  # [N, G + 1, G]
    return jnp.take(table, block_ids + 1, axis=1)  # [N, B, S, G]


def transient_global_attention(
    q,
    k,
    v,
    side_k,
    side_v,
    *,
    local_radius: int,
    token_seg,
    block_ids,
    global_valid,
    local_bias,
    global_bias,
    causal: bool,
    num_buckets: int,
    max_distance: int,
    scale: float,
):
    """The TGA softmax, blockwise. q, k, v [B, S, N, H]; side_k, side_v [B, G, N, H]; token_seg int [B, S]
    (0 = pad); block_ids [B, S]; global_valid [B, G]; local_bias, global_bias [num_buckets, N].
    -> out [B, S, N, H]. Equal to `transient_global_reference` (tests/attention/test_transient_global.py).

    Local part: blocks of L = r + 1 queries against their 3 neighbouring key blocks; the relative offset
    (key - query) of a slot is the same in every block, so its bias is one [N, L, 3L] array. The local and
    global logits share one softmax without being concatenated: a joint row max, then each part's
    exp-sum and value product are added (no [.., 3L + G] copy, no per-block copy of the global values).
    """
    bsz, s, n, h = q.shape
    g = side_k.shape[1]
    bl = local_radius + 1
    sp = -(-s // bl) * bl
    padseq = lambda a: jnp.pad(a, [(0, 0), (0, sp - s)] + [(0, 0)] * (a.ndim - 2))
    nb = sp // bl
    qb = blocks_of(padseq(q), bl)  # [B, nb, L, N, H]
    kb = three_blocks(blocks_of(padseq(k), bl))  # [B, nb, 3L, N, H]
    vb = three_blocks(blocks_of(padseq(v), bl))  # [B, nb, 3L, N, H]
    rel = (
        jnp.arange(3 * bl, dtype=jnp.int32)[None, :] - bl - jnp.arange(bl, dtype=jnp.int32)[:, None]
    )  # [L, 3L]: key - query
    band = jnp.abs(rel) <= local_radius
    if causal:
        band &= rel <= 0
    # Padding (and the zero blocks beyond both ends) has segment 0, which no real query matches.
    seg = padseq(token_seg)  # [B, Sp]
    qseg = blocks_of(seg, bl)  # [B, nb, L]
    kseg = three_blocks(blocks_of(seg, bl))  # [B, nb, 3L]
    local_ok = band & (qseg[..., None] == kseg[..., None, :]) & (qseg[..., None] != 0)  # [B, nb, L, 3L]
    bucket = relative_position_bucket(
        rel, bidirectional=not causal, num_buckets=num_buckets, max_distance=max_distance
    )  # [L, 3L]
    lbias = jnp.transpose(jnp.take(local_bias.astype(jnp.float32), bucket, axis=0), (2, 0, 1))  # [N, L, 3L]
    local_logits = (
        jnp.einsum("BcqNH,BckNH->BNcqk", qb, kb, preferred_element_type=jnp.float32) * scale + lbias[:, None]
    )  # [B, N, nb, L, 3L]
    local_logits = jnp.where(local_ok[:, None], local_logits, -jnp.inf)

    bid = padseq(block_ids + 1) - 1  # [B, Sp]; pads -> -1
    side_ok = global_valid[:, None, :] & (seg != 0)[..., None]  # [B, Sp, G]
    if causal:
        side_ok &= jnp.arange(g, dtype=jnp.int32)[None, None, :] < bid[..., None]  # blocks before its own
    sbias = _side_bias(global_bias, bid, g, causal=causal, num_buckets=num_buckets, max_distance=max_distance)
    sbias = jnp.swapaxes(sbias, 0, 1).reshape(bsz, n, nb, bl, g)  # [B, N, nb, L, G]
    side_logits = (
        jnp.einsum("BcqNH,BgNH->BNcqg", qb, side_k, preferred_element_type=jnp.float32) * scale + sbias
    )  # [B, N, nb, L, G]
    side_logits = jnp.where(blocks_of(side_ok, bl)[:, None], side_logits, -jnp.inf)

    # One softmax over [local | global]: the row max only shifts exponents (no gradient needed through it).
    m = jax.lax.stop_gradient(jnp.maximum(jnp.max(local_logits, -1), jnp.max(side_logits, -1)))  # [B, N, nb, L]
    m = jnp.where(jnp.isfinite(m), m, 0.0)[..., None]
    e_local = jnp.exp(local_logits - m)  # masked entries -> 0
    e_side = jnp.exp(side_logits - m)
    denom = jnp.sum(e_local, -1) + jnp.sum(e_side, -1)  # [B, N, nb, L]
    out = jnp.einsum(
        "BNcqk,BckNH->BcqNH", e_local.astype(v.dtype), vb, preferred_element_type=jnp.float32
    ) + jnp.einsum("BNcqg,BgNH->BcqNH", e_side.astype(v.dtype), side_v, preferred_element_type=jnp.float32)
    denom = jnp.moveaxis(denom, 1, -1)[..., None]  # [B, nb, L, N, 1]
    out = out / jnp.where(denom > 0, denom, 1.0)  # rows that see nothing -> 0
    return out.reshape(bsz, sp, n, h)[:, :s].astype(q.dtype)


def transient_global_reference(
    q,
    k,
    v,
    side_k,
    side_v,
    *,
    local_radius: int,
    token_seg,
    block_ids,
    global_valid,
    local_bias,
    global_bias,
    causal: bool,
    num_buckets: int,
    max_distance: int,
    scale: float,
):
    """Dense O(S^2) TGA straight from the definition (the tests' oracle for the blockwise version):
    one softmax over [all S keys masked to |j - i| <= r and the same segment | all G global tokens]."""
    s, g = q.shape[1], side_k.shape[1]
    rel = jnp.arange(s, dtype=jnp.int32)[None, :] - jnp.arange(s, dtype=jnp.int32)[:, None]  # [S, S]: j - i
    band = (jnp.abs(rel) <= local_radius) & ((rel <= 0) if causal else True)
    same = (token_seg[:, :, None] == token_seg[:, None, :]) & (token_seg != 0)[:, :, None]
    local_ok = band[None] & same  # [B, S, S]
    lbias = jnp.take(
        local_bias.astype(jnp.float32),
        relative_position_bucket(rel, bidirectional=not causal, num_buckets=num_buckets, max_distance=max_distance),
        axis=0,
    )  # [S, S, N]
    side_rel = jnp.arange(g, dtype=jnp.int32)[None, None, :] - block_ids[..., None]  # [B, S, G]
    side_ok = global_valid[:, None, :] & (token_seg != 0)[..., None] & ((side_rel < 0) if causal else True)
    sbias = jnp.take(
        global_bias.astype(jnp.float32),
        relative_position_bucket(
            side_rel, bidirectional=not causal, num_buckets=num_buckets, max_distance=max_distance
        ),
        axis=0,
    )  # [B, S, G, N]
    local_logits = jnp.einsum("BqNH,BkNH->BNqk", q, k, preferred_element_type=jnp.float32) * scale
    side_logits = jnp.einsum("BqNH,BgNH->BNqg", q, side_k, preferred_element_type=jnp.float32) * scale
    logits = jnp.concatenate(
        [local_logits + jnp.transpose(lbias, (2, 0, 1))[None], side_logits + jnp.transpose(sbias, (0, 3, 1, 2))],
        axis=-1,
    )  # [B, N, S, S + G]
    valid = jnp.concatenate([local_ok, side_ok], axis=-1)[:, None]  # [B, 1, S, S + G]
    p, _ = masked_softmax_stats(logits, valid)
    out = jnp.einsum(
        "BNqk,BkNH->BqNH", p.astype(v.dtype), jnp.concatenate([v, side_v], axis=1), preferred_element_type=jnp.float32
    )
    return out.astype(q.dtype)


class TransientGlobalAttention(AttentionBase, kind="transient_global"):
    """LongT5 TGA. Weights: q [D, N, H], k/v [D, N, H], o [N, H, D], global_norm [D],
    local_bias and global_bias [num_buckets, N] (T5 relative-position embeddings)."""

    rope_base = None  # position comes from the relative biases

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        local_radius: int,
        global_block: int,
        causal: bool,
        num_buckets: int = 32,
        max_distance: int = 128,
        norm_eps: float = 1e-6,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        if local_radius < 0:
            raise ValueError(f"config.model.attention.local_radius={local_radius} must be >= 0")
        if global_block < 1:
            raise ValueError(f"config.model.attention.global_block={global_block} must be >= 1")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.local_radius, self.global_block, self.causal = local_radius, global_block, causal
        self.num_buckets, self.max_distance, self.norm_eps, self.dtype = num_buckets, max_distance, norm_eps, dtype
        self._init_heads(rngs, ("q", "k", "v"), d_model, num_heads, head_dim)
        self._init_output(rngs, num_heads, head_dim, d_model)
        self.global_norm = init_param(rngs, (d_model,), ("embed",), nnx.initializers.ones)
        bias_init = nnx.initializers.normal(0.02)
        self.local_bias = init_param(rngs, (num_buckets, num_heads), (None, "heads"), bias_init)
        self.global_bias = init_param(rngs, (num_buckets, num_heads), (None, "heads"), bias_init)

    def _forward(self, x, positions, segment_ids):
        """x [B, S, D] -> y [B, S, D]. positions are unused (relative biases carry position)."""
        b, s, _ = x.shape
        if s % self.global_block:
            raise ValueError(
                f"config.model.attention.global_block={self.global_block} must divide the padded "
                f"sequence length {s} (pad sequences to a multiple of global_block)"
            )
        x = x.astype(self.dtype)
        token_seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        ids, gvalid = global_block_ids(token_seg != 0, self.global_block)
        num_globals = s // self.global_block
        side = rms_norm(global_aggregates(x, ids, num_globals), self.global_norm[...], self.norm_eps)  # [B, G, D]
        q, k, v = self._qkv(x, positions)  # [B, S, N, H] x 3 (no RoPE)
        side_k, side_v = self._project(side, self.k), self._project(side, self.v)  # [B, G, N, H] x 2
        out = transient_global_attention(
            q,
            k,
            v,
            side_k,
            side_v,
            local_radius=self.local_radius,
            token_seg=token_seg,
            block_ids=ids,
            global_valid=gvalid,
            local_bias=self.local_bias[...],
            global_bias=self.global_bias[...],
            causal=self.causal,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
            scale=self.head_dim**-0.5,
        )  # [B, S, N, H]
        return self._output(out)  # [B, S, D]
