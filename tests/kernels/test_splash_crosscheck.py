"""Cross-check against JAX's own splash attention (TPU Pallas kernel, run here in interpret mode).

Splash works on one batch element with [heads, seq, dim] arrays, does not scale the logits, and has
its own mask classes (CausalMask, LocalMask, ChunkedCausalMask, NumpyMask, composed with | and &,
wrapped per head in MultiHeadMask). Splash needs kv compute blocks that are multiples of 128, so
these tests use 128-wide blocks on 256/384-long sequences.

Two checks per mask:
  * outputs and dq/dk/dv of our pallas kernel (interpret) match splash's (interpret);
  * our block_map agrees with splash's MaskInfo block table (0 skip / 1 partial / 2 full): equal
    for base masks; for | and & compositions ours may only be conservative (it reasons on index
    intervals), so it must never claim SKIP or FULL where splash does not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu import splash_attention as splash_pkg
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from effitrans.kernels import masks as M
from effitrans.kernels import pallas

splash_info = splash_pkg.splash_attention_mask_info  # MaskInfo tables (block_mask, data_next)

_BLOCK = 128


def _block_sizes():
    b = _BLOCK
    return splash.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )


def _global_tokens_dense(n, shape):
    q = np.arange(shape[0])[:, None]
    k = np.arange(shape[1])[None, :]
    return (q < n) | (k < n)


# (ours, splash mask for one head given (q_len, kv_len), exact block map?)
CASES = {
    "causal": (M.Causal(), lambda shape: splash_mask.CausalMask(shape), True),
    "local": (
        M.SlidingWindow(100, 30),
        lambda shape: splash_mask.LocalMask(shape, window_size=(100, 30), offset=0),
        True,
    ),
    "causal_and_local": (
        M.Causal() & M.SlidingWindow(150, 150),
        lambda shape: splash_mask.CausalMask(shape) & splash_mask.LocalMask(shape, window_size=(150, 150), offset=0),
        False,
    ),
    "local_or_global": (
        M.SlidingWindow(40, 0) | M.GlobalTokens(8),
        lambda shape: (
            splash_mask.LocalMask(shape, window_size=(40, 0), offset=0)
            | splash_mask.NumpyMask(_global_tokens_dense(8, shape))
        ),
        False,
    ),
    "chunked_causal": (
        M.Causal() & M.Chunked(192),
        lambda shape: splash_mask.ChunkedCausalMask(shape, chunk_size=192),
        False,
    ),
}


def _splash_kernel(name, num_heads, shape, mqa):
    multi = splash_mask.MultiHeadMask([CASES[name][1](shape) for _ in range(num_heads)])
    make = splash.make_splash_mqa_single_device if mqa else splash.make_splash_mha_single_device
    return make(multi, block_sizes=_block_sizes(), interpret=True)


@pytest.mark.parametrize("name, mqa", [("causal", False), ("local", True), ("causal_and_local", False)])
def test_matches_splash_outputs_and_grads(name, mqa):
    n, t, h = 2, 384, 64
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (n, t, h), jnp.float32) * 0.125  # [N, T, H] splash layout
    kh = 1 if mqa else n
    k = jax.random.normal(kk, (kh, t, h), jnp.float32)  # [K, S, H]
    v = jax.random.normal(kv, (kh, t, h), jnp.float32)
    d_out = jax.random.normal(kd, (n, t, h), jnp.float32)
    kernel = _splash_kernel(name, n, (t, t), mqa)

    def splash_fn(q, k, v):
        return kernel(q, k[0], v[0]) if mqa else kernel(q, k, v)  # MQA takes k, v as [S, H]

    def ours_fn(q, k, v):
        # [N, T, H] -> [1, T, N, H] (BTNH); scale 1 because splash does not scale logits.
        out = pallas.pallas_attention(
            jnp.swapaxes(q, 0, 1)[None],
            jnp.swapaxes(k, 0, 1)[None],
            jnp.swapaxes(v, 0, 1)[None],
            mask=CASES[name][0],
            segment_ids=None,
            scale=1.0,
            block_q=_BLOCK,
            block_k=_BLOCK,
            return_lse=False,
            interpret=True,
        )
        return jnp.swapaxes(out[0], 0, 1)  # [N, T, H]

    def run(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    want_out, want_grads = jax.jit(lambda: run(splash_fn))()
    got_out, got_grads = jax.jit(lambda: run(ours_fn))()
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=1e-5)
    for gname, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, err_msg=gname)


def _splash_dense_block_table(info, nq, nk):
    """Splash's forward MaskInfo, un-packed to a dense int8 [nq, nk] table.

    Like our block lists, splash left-packs each q-block row: block_mask[0, i, j] (0/1/2) is the kind
    of the j-th visited kv block and data_next[0, i, j] its index; the packed width may be < nk.
    """
    kinds = np.asarray(info.block_mask)[0]  # [nq, width]
    cols = np.asarray(info.data_next)[0]  # [nq, width]
    dense = np.zeros((nq, nk), np.int8)
    for i in range(nq):
        for j in np.flatnonzero(kinds[i]):
            dense[i, cols[i, j]] = kinds[i, j]
    return dense


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", [(256, 256), (384, 256), (256, 512)])
def test_block_map_matches_splash_mask_info(name, shape):
    ours_mask, make_splash, exact = CASES[name]
    multi = splash_mask.MultiHeadMask([make_splash(shape)])
    info, _ = splash_info.process_mask(multi, (_BLOCK, _BLOCK))
    ours = ours_mask.block_map(shape[0], shape[1], _BLOCK, _BLOCK)  # [nq, nk]
    theirs = _splash_dense_block_table(info, *ours.shape)
    if exact:
        np.testing.assert_array_equal(ours, theirs)
    else:
        # Sound: SKIP and FULL only where splash (exact, from dense blocks) says so.
        assert not np.any((ours == M.SKIP) & (theirs != M.SKIP))
        assert not np.any((ours == M.FULL) & (theirs != M.FULL))
    # The per-row lists our kernel walks are no longer than splash's packed rows when exact.
    lists = M.block_lists(ours)
    if exact:
        np.testing.assert_array_equal(lists.count, (np.asarray(info.block_mask)[0] != 0).sum(-1))
