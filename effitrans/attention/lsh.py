"""Reformer LSH attention (Kitaev et al. 2020, Sec. 2-3), as pure functions + a thin module.

- Shared query-key: one projection W_qk gives queries q = x W_qk; keys are the same vectors normalised to
  unit length, k = q / |q| (the paper's length normalisation); logits q . k / sqrt(H).
- Hashing (angular LSH): random rotations R [H, n_hashes, n_buckets / 2] (a fixed draw per layer, so the
  module is deterministic given its init key); bucket h_r(x) = argmax([x R_r ; -x R_r]). n_buckets = 1
  puts every token in bucket 0.
- Per round r: sort tokens by (bucket, position); cut the sorted order into chunks of `chunk_len`; each
  chunk attends to itself and the previous chunk (the first chunk to the last, wrapping around as in the
  reference implementation; with a single chunk, to itself only). With s_r(i) the sorted rank of i, the
  attended set is P_i^r = {j : c(j) in {c(i), c(i) - 1 (mod n_chunks)}}, c = s_r // chunk_len (the
  paper's chunked P~_i).
- Rounds are combined by their log-sum-exp, with each logit reduced by log N_ij, N_ij = the number of
  rounds in which j is in P_i^r (the paper's Eq. 6 duplicate correction): the result is exactly one
  softmax of query i over the union of its sets, which is what the test's reference computes.
- A token does not attend to itself unless it is the only key it can see: its self logit is set to
  -1e5 (the Reformer value) instead of -inf.
- causal=True masks keys at later positions; segment_ids mask keys of another segment (padding = 0).

Costs: O(n_hashes * S * 2 * chunk_len) logits per head, plus sorts; nothing S x S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.attention.attention_math import masked_softmax_stats, merge_by_lse
from effitrans.attention.base import AttentionBase
from effitrans.layers.params import StateVariable

SELF_LOGIT = -1e5


class LSHRotations(StateVariable):
    """Random rotations of the hash: fixed non-trainable state (saved, sharded and restored with the model,
    never seen by an optimizer over nnx.Param)."""


def lsh_buckets(x: jax.Array, rotations: jax.Array, n_buckets: int) -> jax.Array:
    """x [B, S, N, H], rotations [H, R, n_buckets / 2] -> buckets int32 [B, N, R, S]."""
    if n_buckets == 1:
        b, s, n, _ = x.shape
        return jnp.zeros((b, n, rotations.shape[1], s), jnp.int32)
    rot = jnp.einsum(
        "BSNH,HRF->BNRSF", x.astype(jnp.float32), rotations.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )  # [B, N, R, S, nb/2]
    return jnp.argmax(jnp.concatenate([rot, -rot], axis=-1), axis=-1).astype(jnp.int32)


def lsh_attention(
    qk: jax.Array,
    v: jax.Array,
    buckets: jax.Array,
    *,
    n_buckets: int,
    chunk_len: int,
    causal: bool,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """qk [B, S, N, H] (shared query/key vectors), v [B, S, N, H], buckets [B, N, R, S] -> out [B, S, N, H].

    S need not be a multiple of chunk_len: the sorted order is padded with dummy keys that sort last and
    are never attended.
    """
    b, s, n, h = qk.shape
    r = buckets.shape[2]
    sp = -(-s // chunk_len) * chunk_len
    nc = sp // chunk_len
    seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pos = jnp.arange(sp, dtype=jnp.int32)
    # Sort key: bucket * Sp + position; padding (segment id 0, or positions >= s) gets bucket n_buckets,
    # i.e. sorts last and does not take chunk slots from real tokens.
    if segment_ids is not None:
        buckets = jnp.where((seg == 0)[:, None, None, :], n_buckets, buckets)
    bk = jnp.pad(buckets, [(0, 0), (0, 0), (0, 0), (0, sp - s)], constant_values=n_buckets)  # [B, N, R, Sp]
    perm = jnp.argsort(bk * sp + pos, axis=-1).astype(jnp.int32)  # [B, N, R, Sp]
    rank = jnp.argsort(perm, axis=-1).astype(jnp.int32)  # [B, N, R, Sp]
    chunk_of = rank // chunk_len  # [B, N, R, Sp]

    q = qk.astype(jnp.float32) * (h**-0.5)
    k = qk.astype(jnp.float32) / jnp.maximum(jnp.linalg.norm(qk.astype(jnp.float32), axis=-1, keepdims=True), 1e-6)
    padtok = lambda a: jnp.pad(a, [(0, 0), (0, sp - s)] + [(0, 0)] * (a.ndim - 2))
    q, k, vv = padtok(q), padtok(k), padtok(v.astype(jnp.float32))  # [B, Sp, N, H]
    segp = jnp.pad(seg, [(0, 0), (0, sp - s)], constant_values=-1)  # [B, Sp]

    def gather_tok(a, idx):  # a [B, Sp, N, H], idx [B, N, R, Sp] -> [B, N, R, Sp, H]
        return jnp.take_along_axis(jnp.moveaxis(a, 2, 1)[:, :, None], idx[..., None], axis=3)

    def look_back(a):  # [B, N, R, nc, C, ...] -> [B, N, R, nc, 2C, ...]
        if nc == 1:
            return a
        return jnp.concatenate([a, jnp.roll(a, 1, axis=3)], axis=4)

    chunks = lambda a: a.reshape(*a.shape[:3], nc, chunk_len, *a.shape[4:])
    sq = chunks(gather_tok(q, perm))  # [B, N, R, nc, C, H]
    sk = look_back(chunks(gather_tok(k, perm)))  # [B, N, R, nc, 2C, H]
    sv = look_back(chunks(gather_tok(vv, perm)))  # [B, N, R, nc, 2C, H]
    qpos = chunks(perm)  # [B, N, R, nc, C]
    kpos = look_back(chunks(perm))  # [B, N, R, nc, 2C]

    logits = jnp.einsum("BNRcqH,BNRckH->BNRcqk", sq, sk, precision=jax.lax.Precision.HIGHEST)  # [B, N, R, nc, C, 2C]
    qi, ki = qpos[..., :, None], kpos[..., None, :]  # [..., C, 1], [..., 1, 2C]
    seg_b = segp[:, None, None, :]  # [B, 1, 1, Sp]
    qseg = jnp.take_along_axis(seg_b, perm, axis=-1)  # [B, N, R, Sp]
    valid = (ki < s) & (chunks(qseg)[..., :, None] == look_back(chunks(qseg))[..., None, :])
    if causal:
        valid &= ki <= qi
    # Duplicate count N_ij: rounds r' in which j is in i's chunk or the one before it.
    count = jnp.zeros(logits.shape, jnp.float32)
    for rr in range(r):
        cq = jnp.take_along_axis(chunk_of[:, :, rr], qi.reshape(*qi.shape[:2], -1), axis=-1)
        ck = jnp.take_along_axis(chunk_of[:, :, rr], ki.reshape(*ki.shape[:2], -1), axis=-1)
        cq, ck = cq.reshape(qi.shape), ck.reshape(ki.shape)
        seen = (ck == cq) if nc == 1 else ((ck == cq) | (ck == (cq - 1) % nc))
        count = count + seen.astype(jnp.float32)
    logits = logits - jnp.log(jnp.maximum(count, 1.0))
    logits = jnp.where(qi == ki, SELF_LOGIT, logits)
    p, lse = masked_softmax_stats(logits, valid)  # lse [B, N, R, nc, C]
    out = jnp.einsum("BNRcqk,BNRckH->BNRcqH", p, sv, precision=jax.lax.Precision.HIGHEST)  # [B, N, R, nc, C, H]
    out = out.reshape(b, n, r, sp, h)
    lse = lse.reshape(b, n, r, sp)
    undo = lambda a, extra: jnp.take_along_axis(a, rank.reshape(*rank.shape, *([1] * extra)), axis=3)
    out = undo(out, 1)  # [B, N, R, Sp, H]
    lse = undo(lse, 0)  # [B, N, R, Sp]
    out, _ = merge_by_lse(out, lse, axis=2)  # [B, N, Sp, H]
    return jnp.moveaxis(out, 1, 2)[:, :s].astype(v.dtype)  # [B, S, N, H]


class LSHAttention(AttentionBase, kind="lsh"):
    """Reformer attention. Weights: qk [D, N, H], v [D, N, H], o [N, H, D]; state: rotations [H, R, n_buckets/2]."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        n_buckets: int,
        n_hashes: int,
        chunk_len: int,
        causal: bool,
        rope_base: float | None = 10000.0,
        rope_layout: str = "half",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        if n_buckets != 1 and (n_buckets < 2 or n_buckets % 2):
            raise ValueError(
                f"config.model.attention.n_buckets={n_buckets} must be 1 or an even number >= 2 "
                f"(angular LSH takes argmax over [xR; -xR])"
            )
        if n_hashes < 1:
            raise ValueError(f"config.model.attention.n_hashes={n_hashes} must be >= 1")
        if chunk_len < 1:
            raise ValueError(f"config.model.attention.chunk_len={chunk_len} must be >= 1")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.n_buckets, self.n_hashes, self.chunk_len, self.causal = n_buckets, n_hashes, chunk_len, causal
        self.rope_base, self.rope_layout, self.dtype = rope_base, rope_layout, dtype
        self._init_heads(rngs, ("qk", "v"), d_model, num_heads, head_dim)
        self._init_output(rngs, num_heads, head_dim, d_model)
        self.rotations = LSHRotations(
            jax.random.normal(rngs.params(), (head_dim, n_hashes, max(n_buckets // 2, 1)), jnp.float32),
            logical_axes=(None, None, None),
        )

    def _forward(self, x, positions, segment_ids):
        """x [B, S, D], positions [B, S] -> y [B, S, D]. Shared-QK self-attention, no decode."""
        qk = self._project(x, self.qk, positions)  # [B, S, N, H]
        v = self._project(x, self.v)  # [B, S, N, H]
        buckets = lsh_buckets(qk, jax.lax.stop_gradient(self.rotations[...]), self.n_buckets)  # [B, N, R, S]
        out = lsh_attention(
            qk,
            v,
            buckets,
            n_buckets=self.n_buckets,
            chunk_len=self.chunk_len,
            causal=self.causal,
            segment_ids=segment_ids,
        )  # [B, S, N, H]
        return self._output(out)  # [B, S, D]
