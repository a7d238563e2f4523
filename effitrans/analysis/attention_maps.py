"""Attention probabilities of a trained model and per-head summaries, read beside its forward pass.

The model's own forward pass is not changed: `layer_qk` walks the stack as `TransformerStack` does and
also returns each layer's RoPE'd queries and keys; the probabilities are recomputed from them the way
the reference kernel defines them (float32 softmax of q k^T / sqrt(H) under the layer's mask).

Long inputs never build an S x S array: `attention_sums` walks query rows in blocks of `block_q`, turns
each block's probabilities [B, N, block_q, S] into running sums (entropy, sink mass, mass per offset,
mass each candidate mask keeps) and drops it; `attention_probs` returns only the rows asked for.

    q, k, supports = layer_qk(model, tokens)                         # [L, B, T, N, H], [L, B, S, K, H]
    sums = attention_sums(q[l], k[l], support=supports[l], candidates=(masks.SlidingWindow(63),))
    stats = head_statistics(sums)                                    # entropy, distance, sink, band, period
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effitrans.attention.attention_math import masked_softmax_stats
from effitrans.attention.dense import DenseAttention
from effitrans.kernels import masks as masks_lib

_HIGHEST = jax.lax.Precision.HIGHEST
# Families whose probabilities are softmax(q k^T / sqrt(H)) under one static mask (what `layer_qk` reads).
PROBABILITY_FAMILIES = ("dense",)


def attention_modules(model) -> list:
    """The attention module of every layer of `model` (a model with a `stack` of blocks), each checked to
    be a family whose probabilities can be read."""
    stack = getattr(model, "stack", None)
    if stack is None or not hasattr(stack, "blocks"):
        raise TypeError(
            f"model must be an effitrans Transformer model with a .stack of blocks (CausalLM, Encoder, ...), "
            f"got {type(model).__name__}"
        )
    modules = [block.attn for block in stack.blocks]
    for i, attn in enumerate(modules):
        if type(attn) is not DenseAttention:
            raise ValueError(
                f"layer {i} uses attention family {getattr(attn, 'kind', '?')!r} ({type(attn).__name__}), which has "
                f"no probabilities to show; allowed families: {PROBABILITY_FAMILIES}"
            )
    return modules


def support_mask(attn) -> masks_lib.Mask:
    """The mask a layer's full self-attention pass uses: Causal or Full, & its `extra_mask` when set."""
    mask = masks_lib.Causal() if attn.causal else masks_lib.Full()
    return mask if attn.extra_mask is None else mask & attn.extra_mask


@functools.partial(jax.jit, static_argnums=0)
def _qk_pass(graphdef, state, tokens):
    model = nnx.merge(graphdef, state)
    stack = model.stack
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # [B, T]
    x = stack.embed(tokens)  # [B, T, D]
    qs, ks = [], []
    for block in stack.blocks:
        q, k, _ = block.attn._qkv(block.attn_norm(x), positions)  # [B, T, N, H], [B, T, K, H]
        qs.append(q)
        ks.append(k)
        x, _ = block(x, positions=positions)
    return jnp.stack(qs), jnp.stack(ks)  # [L, B, T, N, H], [L, B, T, K, H]


def layer_qk(model, tokens) -> tuple[jax.Array, jax.Array, list]:
    """Queries and keys of every layer for `tokens` int [B, T] (self-attention, positions 0..T-1).

    Returns (q [L, B, T, N, H], k [L, B, T, K, H], supports: the L masks of the layers' passes).
    """
    modules = attention_modules(model)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an int array [batch, length], got {tokens.dtype} {tuple(tokens.shape)}")
    graphdef, state = nnx.split(model)
    q, k = _qk_pass(graphdef, state, tokens)
    return q, k, [support_mask(attn) for attn in modules]


def _row_probs(q_rows, k, support, q_idx, scale):
    """Probabilities of query rows q_rows [B, R, N, H] (at positions q_idx int [R]) over k [B, S, K, H]
    -> (p [B, N, R, S] float32, allowed bool [R, S])."""
    b, r, n, h = q_rows.shape
    s, kh = k.shape[1], k.shape[2]
    qf = q_rows.astype(jnp.float32).reshape(b, r, kh, n // kh, h)  # [B, R, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qf, k.astype(jnp.float32), precision=_HIGHEST) * scale  # [B, K, G, R, S]
    kv_idx = jnp.arange(s, dtype=jnp.int32)
    allowed = jnp.broadcast_to(support.mask_fn(q_idx[:, None], kv_idx[None, :]), (r, s))  # [R, S]
    p, _ = masked_softmax_stats(logits, allowed)  # [B, K, G, R, S]
    return p.reshape(b, n, r, s), allowed


def _check_qk(q, k, support) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [B, T, N, H] and [B, S, K, H], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} do not fit: equal batch and head_dim and N % K == 0 needed"
        )
    if not isinstance(support, masks_lib.Mask):
        raise TypeError(f"support must be a kernels.masks.Mask, got {type(support).__name__}: {support!r}")


def attention_probs(q, k, *, support: masks_lib.Mask, rows=None, scale: float | None = None) -> jax.Array:
    """Attention probabilities of the query rows `rows` (default all): q [B, T, N, H], k [B, S, K, H]
    -> [B, N, R, S] float32. Rows that see no key are all zero; memory is B * N * R * S."""
    _check_qk(q, k, support)
    t = q.shape[1]
    rows = np.arange(t) if rows is None else np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be a non-empty 1-D array of query indices, got {rows!r}")
    if rows.min() < 0 or rows.max() >= t:
        raise ValueError(f"rows must lie in [0, {t}) (the query length), got values {rows.min()}..{rows.max()}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return _rows_probs(q, k, jnp.asarray(rows, jnp.int32), support, scale)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _rows_probs(q, k, idx, support, scale):
    return _row_probs(jnp.take(q, idx, axis=1), k, support, idx, scale)[0]  # [B, N, R, S]


def _block_sums(p, allowed, q_idx, candidates, sink: int) -> dict:
    """Sums over one block of rows: p [B, N, R, S] with allowed [R, S] at query positions q_idx [R].

    Returns (sums, p_rows [N, R, S]): sums holds rows (scalar: rows that see a key, times B), entropy and sink
    [N], coverage [M, N] (mass each candidate keeps), kept [M] and pairs (scalars: allowed pairs each candidate
    keeps, and all allowed pairs; per sequence). The callers add profile (`_offset_profile`) and kv_len.
    """
    b, n, r, s = p.shape
    kv_idx = jnp.arange(s, dtype=jnp.int32)
    row_ok = jnp.any(allowed, axis=-1)  # [R]
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)  # [B, N, R, S]
    p_rows = jnp.sum(p, axis=0)  # [N, R, S]
    sums = {
        "rows": b * jnp.sum(row_ok.astype(jnp.float32)),
        "entropy": -jnp.sum(plogp, axis=(0, 2, 3)),  # [N]
        "sink": jnp.sum(p_rows[:, :, :sink], axis=(1, 2)),  # [N]
        "pairs": jnp.sum(allowed.astype(jnp.float32)),
    }
    coverage, kept = [], []
    for mask in candidates:
        keep = allowed & jnp.broadcast_to(mask.mask_fn(q_idx[:, None], kv_idx[None, :]), (r, s))  # [R, S]
        coverage.append(jnp.sum(p_rows * keep, axis=(1, 2)))  # [N]
        kept.append(jnp.sum(keep.astype(jnp.float32)))
    sums["coverage"] = jnp.stack(coverage) if coverage else jnp.zeros((0, n), jnp.float32)  # [M, N]
    sums["kept"] = jnp.stack(kept) if kept else jnp.zeros((0,), jnp.float32)  # [M]
    return sums, p_rows


def _offset_profile(p_rows, q_idx, s: int, t: int):
    """Mass at each offset d = i - j: p_rows [N, R, S] at query positions q_idx [R] -> [N, T + S - 1]
    (index d + S - 1). Rows at or past t (padding) hold no mass and are pointed at index 0."""
    d = q_idx[:, None] - jnp.arange(s, dtype=jnp.int32)[None, :] + (s - 1)  # [R, S]
    d = jnp.where(q_idx[:, None] < t, d, 0)
    n = p_rows.shape[0]
    return jnp.zeros((n, t + s - 1), jnp.float32).at[:, d.reshape(-1)].add(p_rows.reshape(n, -1))


def probs_sums(probs, *, support: masks_lib.Mask, candidates: Sequence[masks_lib.Mask] = (), sink: int = 4) -> dict:
    """The sums of `attention_sums` from given probabilities probs [B, N, T, S] (e.g. hand-built ones), which
    must be 0 on the pairs `support` does not allow (a ValueError otherwise)."""
    probs = jnp.asarray(probs, jnp.float32)
    if probs.ndim != 4:
        raise ValueError(f"probs must be [batch, heads, q_len, kv_len], got shape {tuple(probs.shape)}")
    _check_sums_args(1, sink)
    outside = float(jnp.max(jnp.where(support.dense(probs.shape[2], probs.shape[3]), 0.0, jnp.abs(probs))))
    if outside > 0:
        raise ValueError(f"probs put mass {outside:g} on a pair the support {support!r} does not allow")
    return _probs_sums(probs, support, tuple(candidates), sink)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _probs_sums(probs, support, candidates, sink):
    t, s = probs.shape[2], probs.shape[3]
    q_idx = jnp.arange(t, dtype=jnp.int32)
    allowed = jnp.broadcast_to(support.mask_fn(q_idx[:, None], jnp.arange(s)[None, :]), (t, s))
    sums, p_rows = _block_sums(probs, allowed, q_idx, tuple(candidates), sink)
    sums["profile"] = _offset_profile(p_rows, q_idx, s, t)
    sums["kv_len"] = jnp.asarray(s, jnp.float32)
    return sums


def _check_sums_args(block_q, sink) -> None:
    for name, value in (("block_q", block_q), ("sink", sink)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def attention_sums(
    q,
    k,
    *,
    support: masks_lib.Mask,
    candidates: Sequence[masks_lib.Mask] = (),
    block_q: int = 128,
    sink: int = 4,
    scale: float | None = None,
) -> dict:
    """Running sums of one layer's attention over query blocks of `block_q` rows (never S x S).

    q [B, T, N, H], k [B, S, K, H]; support: the layer's mask; candidates: masks whose kept mass is summed.
    Returns the dict of `_block_sums` plus profile [N, T + S - 1]; `head_statistics` turns it into means.
    Sums of several inputs of the same shapes add up key by key.
    """
    _check_qk(q, k, support)
    _check_sums_args(block_q, sink)
    candidates = tuple(candidates)
    for i, mask in enumerate(candidates):
        if not isinstance(mask, masks_lib.Mask):
            raise TypeError(f"candidates[{i}] must be a kernels.masks.Mask, got {type(mask).__name__}: {mask!r}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    return _attention_sums(q, k, support, candidates, block_q, sink, scale)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _attention_sums(q, k, support, candidates, block_q, sink, scale):
    b, t, n, h = q.shape
    s = k.shape[1]
    nb = -(-t // block_q)
    q_pad = jnp.pad(q, ((0, 0), (0, nb * block_q - t), (0, 0), (0, 0)))  # [B, nb * R, N, H]
    q_blocks = jnp.moveaxis(q_pad.reshape(b, nb, block_q, n, h), 1, 0)  # [nb, B, R, N, H]

    def body(total, xs):
        q_rows, start = xs
        q_idx = start + jnp.arange(block_q, dtype=jnp.int32)  # [R]
        p, allowed = _row_probs(q_rows, k, support, q_idx, scale)  # [B, N, R, S], [R, S]
        allowed = allowed & (q_idx < t)[:, None]
        sums, p_rows = _block_sums(p * allowed, allowed, q_idx, candidates, sink)
        sums["profile"] = _offset_profile(p_rows, q_idx, s, t)
        return jax.tree_util.tree_map(jnp.add, total, sums), None

    total = _zero_sums(n, t, s, len(candidates))
    starts = jnp.arange(nb, dtype=jnp.int32) * block_q
    total, _ = jax.lax.scan(body, total, (q_blocks, starts))
    return {**total, "kv_len": jnp.asarray(s, jnp.float32)}


def _zero_sums(n: int, t: int, s: int, m: int) -> dict:
    """Zero running sums for N heads, M candidates and lengths T, S."""
    z = jnp.zeros((), jnp.float32)
    return {
        "rows": z,
        "entropy": jnp.zeros((n,), jnp.float32),
        "sink": jnp.zeros((n,), jnp.float32),
        "pairs": z,
        "coverage": jnp.zeros((m, n), jnp.float32),
        "kept": jnp.zeros((m,), jnp.float32),
        "profile": jnp.zeros((n, t + s - 1), jnp.float32),
    }


def add_sums(a: dict | None, b: dict) -> dict:
    """Key-by-key sum of two `attention_sums` results of the same lengths (a None: b), as numpy float64."""
    b = {key: np.asarray(v, np.float64) for key, v in b.items()}
    if a is None:
        return b
    if a["profile"].shape != b["profile"].shape or a["kv_len"] != b["kv_len"]:
        raise ValueError(
            f"sums of different lengths cannot be added: profiles {a['profile'].shape} and {b['profile'].shape}"
        )
    return {key: a[key] if key == "kv_len" else a[key] + b[key] for key in b}


def head_statistics(sums: dict, *, band: int = 8, periods: Sequence[int] = tuple(range(2, 129))) -> dict:
    """Per-head means over the summed rows: numpy arrays [N] unless noted.

    entropy (nats), distance (mean |i - j| in tokens), sink (mass on the first `sink` keys), band (mass with
    |i - j| <= band), period (the offset period l whose multiples beyond the band hold the most mass
    relative to chance, i.e. to 1/l of the mass beyond the band; 0 when no period applies), periodic (the mass
    on those multiples), periodic_lift (that mass over its chance share), coverage [M, N], density [M]
    (kept pairs / allowed pairs) and profile [N, T + S - 1] (mean mass at offset d = i - j, index d + S - 1).
    """
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise ValueError(f"band must be an int >= 0, got {band!r}")
    rows = float(np.asarray(sums["rows"]))
    if rows <= 0:
        raise ValueError("sums hold no query row that sees a key; nothing to summarise")
    profile = np.asarray(sums["profile"], np.float64) / rows  # [N, T + S - 1]
    n, width = profile.shape
    offsets = np.arange(width) - (int(np.asarray(sums["kv_len"])) - 1)  # [T + S - 1]: d = i - j
    dist = np.abs(offsets)
    beyond = dist > band
    outside = (profile * beyond).sum(-1)  # [N]
    best_period = np.zeros(n, np.int64)
    best_mass = np.zeros(n)
    best_lift = np.zeros(n)
    for l in periods:
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)) or l < 2:
            raise ValueError(f"periods must be ints >= 2, got {l!r}")
        if l > dist.max():
            continue
        mass = (profile * (beyond & (dist % l == 0))).sum(-1)  # [N]
        lift = np.where(outside > 0, mass * l / np.where(outside > 0, outside, 1.0), 0.0)
        better = lift > best_lift
        best_period = np.where(better, l, best_period)
        best_mass = np.where(better, mass, best_mass)
        best_lift = np.where(better, lift, best_lift)
    pairs = float(np.asarray(sums["pairs"]))
    return {
        "entropy": np.asarray(sums["entropy"], np.float64) / rows,
        "distance": (profile * dist).sum(-1),
        "sink": np.asarray(sums["sink"], np.float64) / rows,
        "band": (profile * ~beyond).sum(-1),
        "period": best_period,
        "periodic": best_mass,
        "periodic_lift": best_lift,
        "coverage": np.asarray(sums["coverage"], np.float64) / rows,
        "density": np.asarray(sums["kept"], np.float64) / pairs,
        "profile": profile,
    }
