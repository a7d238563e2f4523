"""Pooling and upsampling along the sequence axis (Funnel-Transformer, Dai et al., 2020).

Pure functions on arrays shaped [B, T, ...] (axis 1 is time), no Flax, so they can be tested alone and
compared with HF transformers' `FunnelAttentionStructure.pool_tensor` / `upsample`.

Windows: token t (after the CLS token when `separate_cls`) falls in window t // stride. The last window
may be partial; it is pooled over the tokens it has (HF's `ceil_mode=True`), or dropped with
`truncate_seq=True`. With `separate_cls` the first token (CLS) is its own window and is never mixed
with other tokens, so a CLS summary survives any number of poolings.

Modes: "mean" and "max" for hidden states, "slice" (the first token of each window, i.e. a strided
slice), and "min" for masks and segment ids (a window is real only if all its tokens are real and
in the same segment's minimum id, as in HF). Positions pool with "first" (integer; the position of the
window's first token, as HF's `stride_pool_pos`) or "mean" (the float centre of the window; RoPE takes
fractional positions).

**HF difference** (recorded in docs/funnel.md): HF's `truncate_seq` drops exactly one trailing token
(right for its even lengths and stride 2); here it drops the partial trailing window for any stride. The
two agree whenever the length after CLS is a multiple of the stride plus one (HF's case: even length,
stride 2). HF also places the pooled CLS at relative position 1 - 2**block; here CLS keeps its position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIDDEN_POOL_MODES = ("mean", "max", "slice")  # what a funnel's `pooling` may name (hidden states)
POOL_MODES = (*HIDDEN_POOL_MODES, "min")  # "min" pools masks and segment ids
POSITION_MODES = ("first", "mean")


def _check_stride(stride) -> None:
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride={stride!r} is not allowed: expected an int >= 1")


def pooled_length(length: int, stride: int, *, separate_cls: bool = True, truncate_seq: bool = False) -> int:
    """Length of a [B, length] sequence after one pooling; raises ValueError if fewer than one token remains."""
    _check_stride(stride)
    if length < 1:
        raise ValueError(f"cannot pool a sequence of length {length}: expected length >= 1")
    cls = 1 if separate_cls else 0
    rest = length - cls
    windows = rest // stride if truncate_seq else -(-rest // stride)
    out = cls + windows
    if out < 1:
        raise ValueError(
            f"pooling length {length} with stride={stride} (separate_cls={separate_cls}, "
            f"truncate_seq={truncate_seq}) leaves {out} tokens; expected at least 1: use a smaller "
            f"stride, truncate_seq=False or separate_cls=True"
        )
    return out


def _reduce(x: jax.Array, mode: str, axis: int) -> jax.Array:
    if mode == "mean":
        return jnp.mean(x, axis=axis)
    if mode == "max":
        return jnp.max(x, axis=axis)
    if mode == "min":
        return jnp.min(x, axis=axis)
    if mode == "slice":
        return jnp.take(x, 0, axis=axis)
    raise ValueError(f"pooling mode={mode!r} is not one of {POOL_MODES}")


def pool_sequence(
    x: jax.Array, stride: int, *, mode: str = "mean", separate_cls: bool = True, truncate_seq: bool = False
) -> jax.Array:
    """x [B, T, ...] -> [B, T', ...] with T' = pooled_length(T, stride, ...); stride 1 returns x unchanged."""
    if mode not in POOL_MODES:
        raise ValueError(f"pooling mode={mode!r} is not one of {POOL_MODES}")
    out_len = pooled_length(x.shape[1], stride, separate_cls=separate_cls, truncate_seq=truncate_seq)
    if stride == 1:
        return x
    b = x.shape[0]
    cls, rest = (x[:, :1], x[:, 1:]) if separate_cls else (x[:, :0], x)
    n = rest.shape[1]
    full = n // stride
    body = rest[:, : full * stride].reshape(b, full, stride, *rest.shape[2:])  # [B, W, stride, ...]
    parts = [cls, _reduce(body, mode, axis=2)]  # [B, W, ...]
    if not truncate_seq and n % stride:
        tail = rest[:, full * stride :]  # [B, n % stride, ...]
        parts.append(jnp.expand_dims(_reduce(tail, mode, axis=1), 1))  # [B, 1, ...]
    out = jnp.concatenate(parts, axis=1)  # [B, T', ...]
    assert out.shape[1] == out_len, (out.shape, out_len)
    return out


def pool_mask(
    mask: jax.Array, stride: int, *, separate_cls: bool = True, truncate_seq: bool = False, mode: str = "min"
) -> jax.Array:
    """Masks / segment ids int [B, T] -> [B, T'].

    "min" (keys and outputs): a pooled token is real only if its whole window is (HF). "max" (queries):
    a pooled token that covers any real token still attends to the real keys, as HF's key-only masking
    lets it, so the real tokens of a partly padded window get a meaningful state when upsampled.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mask pooling mode={mode!r} is not one of ['min', 'max']")
    return pool_sequence(mask, stride, mode=mode, separate_cls=separate_cls, truncate_seq=truncate_seq)


def pool_positions(
    positions: jax.Array, stride: int, *, mode: str = "first", separate_cls: bool = True, truncate_seq: bool = False
) -> jax.Array:
    """RoPE positions [B, T] -> [B, T']: the window's first position (int) or its mean (float32)."""
    if mode not in POSITION_MODES:
        raise ValueError(f"position pooling mode={mode!r} is not one of {POSITION_MODES}")
    if mode == "first":
        return pool_sequence(positions, stride, mode="slice", separate_cls=separate_cls, truncate_seq=truncate_seq)
    return pool_sequence(
        positions.astype(jnp.float32), stride, mode="mean", separate_cls=separate_cls, truncate_seq=truncate_seq
    )


def upsample(x: jax.Array, stride: int, target_len: int, *, separate_cls: bool = True) -> jax.Array:
    """x [B, T', D] -> [B, target_len, D]: each pooled token repeated `stride` times (CLS once, when separate).

    Tokens dropped by truncate_seq come back as zeros (as in HF); the decoder's residual from the first
    block carries them.
    """
    _check_stride(stride)
    if stride == 1:
        if x.shape[1] != target_len:
            raise ValueError(f"upsample with stride 1 needs x of length target_len={target_len}, got {x.shape[1]}")
        return x
    cls, rest = (x[:, :1], x[:, 1:]) if separate_cls else (x[:, :0], x)
    want = target_len - cls.shape[1]
    rep = jnp.repeat(rest, stride, axis=1)  # [B, T'' * stride, D]
    if rep.shape[1] < want:
        pad = [(0, 0)] * rep.ndim
        pad[1] = (0, want - rep.shape[1])
        rep = jnp.pad(rep, pad)
    return jnp.concatenate([cls, rep[:, :want]], axis=1)  # [B, target_len, D]
