"""Shared helpers for kernel tests: tolerances, random inputs, impl-vs-reference checks.

``check_impl_against_reference(impl, ...)`` is the one entry point every attention implementation's
tests go through (xla here, pallas in test_pallas_flash.py); keep its signature stable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from effitrans import kernels

# (forward atol, gradient atol); from the tokamax / splash attention suites. bfloat16 also gets the
# same number as rtol because gradients of magnitude > 1 carry bf16 rounding of ~2^-8 relative.
TOLERANCES = {
    jnp.dtype(jnp.float32): (1e-5, 5e-5),
    jnp.dtype(jnp.bfloat16): (1e-2, 2e-2),
}


# kernels.attention under one jit (eager dispatch compiles every small op separately: slow in tests).
attention_jit = jax.jit(
    kernels.attention, static_argnames=("mask", "scale", "impl", "block_q", "block_k", "return_lse")
)
decode_jit = jax.jit(kernels.decode_attention, static_argnames=("scale", "impl", "block_k"))


def random_qkv(
    seed: int,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype=jnp.float32,
    q_scale: float = 1.0,
):
    """Normal q [B,T,N,H] (times q_scale, for large-logit tests), k [B,S,K,H], v [B,S,K,Hv]."""
    # numpy RNG: no per-shape compilation.
    rng = np.random.RandomState(seed)
    hv = head_dim if v_head_dim is None else v_head_dim
    q = rng.standard_normal((batch, q_len, num_heads, head_dim)).astype(np.float32) * q_scale
    k = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, num_kv_heads, hv)).astype(np.float32)
    return tuple(jnp.asarray(x, jnp.float32).astype(dtype) for x in (q, k, v))


def random_segment_ids(seed: int, batch: int, length: int, num_segments: int = 3) -> jax.Array:
    """Sorted int32 segment ids [B, length] (packed sequences), values in [0, num_segments)."""
    rng = np.random.RandomState(seed)
    cuts = np.sort(rng.randint(0, length + 1, size=(batch, num_segments - 1)), axis=1)
    pos = np.arange(length)[None, :, None]
    return jnp.asarray((pos >= cuts[:, None, :]).sum(-1), jnp.int32)


def _assert_close(name, got, want, atol, rtol):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got) == np.isfinite(want)), f"{name}: finiteness differs"
    both = np.isfinite(want)
    assert np.array_equal(got[~both], want[~both]), f"{name}: non-finite entries differ"
    np.testing.assert_allclose(got[both], want[both], atol=atol, rtol=rtol, err_msg=name)


def check_impl_against_reference(
    impl: str,
    *,
    batch: int = 1,
    q_len: int = 64,
    kv_len: int | None = None,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    head_dim: int = 32,
    v_head_dim: int | None = None,
    dtype=jnp.float32,
    mask=None,
    segment_ids=None,
    scale=None,
    block_q=None,
    block_k=None,
    q_scale: float = 1.0,
    check_grads: bool = True,
    check_lse: bool = True,
    seed: int = 0,
    fwd_tol=None,
    grad_tol=None,
    jit: bool = True,
):
    """Runs `impl` and "reference" on the same random inputs; asserts out, lse, dq, dk, dv match.

    The reference sees the same (possibly bfloat16) inputs and computes in float32. Gradients use
    jax.vjp with random cotangents for out and lse (lse cotangent 0 where lse is -inf).
    segment_ids: None, an int [B, T] array, a (q_seg, kv_seg) tuple, or "random" (packed self-attn).
    Returns (out, lse, grads) of `impl` for further checks.
    """
    kv_len = q_len if kv_len is None else kv_len
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    q, k, v = random_qkv(
        seed,
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        dtype=dtype,
        q_scale=q_scale,
    )
    if isinstance(segment_ids, str) and segment_ids == "random":
        assert q_len == kv_len, "random segment ids are for self-attention"
        segment_ids = random_segment_ids(seed, batch, q_len)
    dflt_fwd, dflt_grad = TOLERANCES[jnp.dtype(dtype)]
    fwd_tol = dflt_fwd if fwd_tol is None else fwd_tol
    grad_tol = dflt_grad if grad_tol is None else grad_tol
    rtol_fwd = fwd_tol if jnp.dtype(dtype) == jnp.bfloat16 else 0.0
    rtol_grad = grad_tol if jnp.dtype(dtype) == jnp.bfloat16 else 0.0

    rng = np.random.RandomState(seed + 1)
    d_out = jnp.asarray(rng.standard_normal((batch, q_len, num_heads, v.shape[-1])), jnp.float32).astype(dtype)
    d_lse = jnp.asarray(rng.standard_normal((batch, num_heads, q_len)), jnp.float32)

    def run(name):
        def f(q, k, v):
            return kernels.attention(
                q,
                k,
                v,
                mask=mask,
                segment_ids=segment_ids,
                scale=scale,
                impl=name,
                block_q=block_q if name != "reference" else None,
                block_k=block_k if name != "reference" else None,
                return_lse=True,
            )

        def f_and_grads(q, k, v, d_out, d_lse):
            # One compiled program per impl: forward, then the VJP with random cotangents (zero on rows
            # whose lse is -inf, where d lse is undefined).
            (out, lse), vjp = jax.vjp(f, q, k, v)
            grads = vjp((d_out, jnp.where(jnp.isfinite(lse), d_lse, 0.0))) if check_grads else None
            return out, lse, grads

        return (jax.jit(f_and_grads) if jit else f_and_grads)(q, k, v, d_out, d_lse)

    ref_out, ref_lse, ref_grads = run("reference")
    out, lse, grads = run(impl)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == jnp.float32 and lse.shape == (batch, num_heads, q_len)
    _assert_close(f"{impl} out", out, ref_out, fwd_tol, rtol_fwd)
    if check_lse:
        # lse is float32 in both; bf16 inputs make it as accurate as the logits.
        _assert_close(f"{impl} lse", lse, ref_lse, max(fwd_tol, 1e-5), rtol_fwd)
    if check_grads:
        for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert g.dtype == rg.dtype and g.shape == rg.shape
            assert bool(jnp.all(jnp.isfinite(g))), f"{impl} {name} not finite"
            _assert_close(f"{impl} {name}", g, rg, grad_tol, rtol_grad)
    return out, lse, grads
