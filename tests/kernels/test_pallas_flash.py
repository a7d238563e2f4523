"""Pallas block-sparse flash attention against the dense reference, plus TPU/GPU lowering checks.

Everything runs the kernels with interpret=True on CPU. Interpret mode compiles a large program per
shape, so shapes are tiny (lengths <= 96, blocks 16/32) and each case compiles once. The "tpu"
formulation (scalar-prefetched block lists) is what kernels.attention(impl="pallas") uses on CPU;
the "gpu" (Triton) formulation is checked here through the same interpreter by passing platform.
Lowering for real hardware is checked with jax.export (no device needed): Mosaic for TPU, Triton
for CUDA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effitrans.kernels import masks as M
from effitrans.kernels import pallas
from effitrans.kernels.reference import reference_attention
from tests.kernels.helpers import TOLERANCES, check_impl_against_reference, random_qkv, random_segment_ids

# ----------------------------------------------------------------------------------------------
# Through kernels.attention(impl="pallas") (the "tpu" formulation in interpret mode).

MASKS = {
    "causal": M.Causal(),
    "sliding": M.SlidingWindow(20, 5),
    "strided": M.Strided(8),
    "fixed": M.Fixed(16, 4),
    "global_or_sliding": M.GlobalTokens(4) | M.SlidingWindow(8, 0),
    "chunked": M.Chunked(24),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_float32_gqa(name):
    # GQA (4 query heads on 2 kv heads), head dim 24 (not a power of two), 40 is not a multiple of 16.
    check_impl_against_reference(
        "pallas", q_len=40, num_heads=4, num_kv_heads=2, head_dim=24, mask=MASKS[name], block_q=16, block_k=16, seed=1
    )


def test_mqa_cross_lengths_head64():
    # MQA, q_len != kv_len (neither a block multiple), bottom-right causal, blocks of different sizes.
    check_impl_against_reference(
        "pallas",
        q_len=24,
        kv_len=72,
        num_heads=3,
        num_kv_heads=1,
        head_dim=64,
        v_head_dim=40,
        mask=M.Causal(offset=M.bottom_right_offset(24, 72)),
        block_q=16,
        block_k=32,
        seed=2,
    )


def test_segment_ids_with_fully_masked_rows():
    # Segments across q and kv differ, and the causal mask leaves some queries with no key at all.
    q_seg = jnp.asarray([[0] * 20 + [1] * 20, [0] * 40], jnp.int32)
    kv_seg = jnp.asarray([[0] * 30 + [1] * 26, [1] * 8 + [0] * 48], jnp.int32)
    out, lse, grads = check_impl_against_reference(
        "pallas",
        batch=2,
        q_len=40,
        kv_len=56,
        num_heads=2,
        head_dim=16,
        mask=M.Causal(),
        segment_ids=(q_seg, kv_seg),
        block_q=16,
        block_k=16,
        seed=3,
    )
    # Row 20 of batch 0 (segment 1, position 20) sees no key of segment 1 (those start at 30).
    assert bool(jnp.isneginf(lse[0, :, 20]).all())
    assert bool((out[0, 20] == 0).all())


@pytest.mark.slow
def test_packed_random_segments_sliding():
    check_impl_against_reference(
        "pallas",
        batch=2,
        q_len=48,
        num_heads=2,
        head_dim=16,
        mask=M.SlidingWindow(12, 0),
        segment_ids="random",
        block_q=16,
        block_k=16,
        seed=4,
    )


def test_fully_masked_rows_zero_and_finite_grads():
    # Causal with offset -8: the first 8 queries see nothing (they sit before key 0).
    out, lse, grads = check_impl_against_reference(
        "pallas", q_len=32, num_heads=2, head_dim=16, mask=M.Causal(offset=-8), block_q=16, block_k=16, seed=5
    )
    assert bool((out[:, :8] == 0).all())
    assert bool(jnp.isneginf(lse[:, :, :8]).all())
    for g in grads:
        assert bool(jnp.isfinite(g).all())
    assert bool((grads[0][:, :8] == 0).all())  # dq of rows that see nothing


def test_everything_masked():
    # A mask with no allowed pair at all: the block lists are empty; output 0, lse -inf, grads 0.
    out, lse, grads = check_impl_against_reference(
        "pallas",
        q_len=16,
        kv_len=32,
        num_heads=2,
        head_dim=16,
        mask=M.Causal(offset=-40),
        block_q=16,
        block_k=16,
        seed=6,
    )
    assert bool((out == 0).all()) and bool(jnp.isneginf(lse).all())
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize(
    "mask",
    [
        pytest.param(M.Causal(), marks=pytest.mark.slow, id="causal"),
        pytest.param(M.SlidingWindow(16, 0) | M.GlobalTokens(8), id="sliding_or_global"),
    ],
)
def test_bfloat16(mask):
    check_impl_against_reference(
        "pallas",
        q_len=48,
        kv_len=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        dtype=jnp.bfloat16,
        mask=mask,
        block_q=16,
        block_k=16,
        seed=7,
    )


@pytest.mark.slow
def test_large_logits():
    check_impl_against_reference(
        "pallas",
        q_len=32,
        num_heads=2,
        head_dim=16,
        mask=M.Causal(),
        block_q=16,
        block_k=16,
        q_scale=30.0,
        seed=8,
        fwd_tol=1e-4,
        grad_tol=5e-4,
    )


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    q_len=st.integers(1, 64),
    kv_len=st.integers(1, 64),
    group=st.sampled_from([1, 2]),
    kv_heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([8, 16, 24]),
    block_q=st.sampled_from([16, 32]),
    block_k=st.sampled_from([16, 32]),
    mask_name=st.sampled_from(sorted(MASKS)),
)
def test_hypothesis_random_shapes(q_len, kv_len, group, kv_heads, head_dim, block_q, block_k, mask_name):
    check_impl_against_reference(
        "pallas",
        q_len=q_len,
        kv_len=kv_len,
        num_heads=group * kv_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        mask=MASKS[mask_name],
        block_q=block_q,
        block_k=block_k,
        seed=q_len * 100 + kv_len,
    )


# ----------------------------------------------------------------------------------------------
# Direct calls: the "gpu" (Triton) formulation, block skipping, determinism, errors.


def _check_direct(
    platform,
    *,
    mask,
    q_len,
    kv_len,
    num_heads,
    num_kv_heads,
    head_dim,
    v_head_dim=None,
    segment_ids=None,
    block_q=16,
    block_k=16,
    dtype=jnp.float32,
    seed=0,
):
    """pallas_attention(platform=...) vs the reference: out, lse, dq, dk, dv."""
    q, k, v = random_qkv(
        seed,
        batch=2,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        dtype=dtype,
    )
    scale = head_dim**-0.5

    def pallas_fn(q, k, v):
        return pallas.pallas_attention(
            q,
            k,
            v,
            mask=mask,
            segment_ids=segment_ids,
            scale=scale,
            block_q=block_q,
            block_k=block_k,
            return_lse=True,
            interpret=True,
            platform=platform,
        )

    def ref_fn(q, k, v):
        return reference_attention(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale, return_lse=True)

    def run(fn, q, k, v, d_out, d_lse):  # one compile for forward and backward
        (out, lse), vjp = jax.vjp(fn, q, k, v)
        return out, lse, vjp((d_out, d_lse))

    run = jax.jit(run, static_argnums=0)
    fwd_tol, grad_tol = TOLERANCES[jnp.dtype(dtype)]
    ref_out, ref_lse = jax.jit(ref_fn)(q, k, v)
    finite = np.isfinite(np.asarray(ref_lse))
    kc1, kc2 = jax.random.split(jax.random.key(seed + 1))
    d_out = jax.random.normal(kc1, ref_out.shape, jnp.float32).astype(ref_out.dtype)
    d_lse = jnp.where(finite, jax.random.normal(kc2, ref_lse.shape, jnp.float32), 0.0)
    out, lse, grads = run(pallas_fn, q, k, v, d_out, d_lse)
    _, _, ref_grads = run(ref_fn, q, k, v, d_out, d_lse)

    # bfloat16 also gets rtol = atol (as in helpers): outputs near 2 are one bf16 ulp (2^-6) apart.
    def rtol(tol):
        return tol if jnp.dtype(dtype) == jnp.bfloat16 else 0.0

    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=fwd_tol, rtol=rtol(fwd_tol)
    )
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(
        np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=max(fwd_tol, 1e-5), rtol=rtol(fwd_tol)
    )
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert bool(jnp.isfinite(g).all()), name
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(rg, np.float32), atol=grad_tol, rtol=rtol(grad_tol), err_msg=name
        )


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_gpu_formulation_gqa_strided_segments():
    # Head dims 24 / 40 get zero-padded to 32 / 64 on this path; segments mask across the batch.
    segs = (random_segment_ids(11, 2, 40), random_segment_ids(12, 2, 56))
    _check_direct(
        "gpu",
        mask=M.Strided(8),
        q_len=40,
        kv_len=56,
        num_heads=4,
        num_kv_heads=2,
        head_dim=24,
        v_head_dim=40,
        segment_ids=segs,
        block_q=16,
        block_k=32,
        seed=11,
    )


@pytest.mark.slow
def test_gpu_formulation_mqa_fully_masked_rows():
    _check_direct(
        "gpu",
        mask=M.Causal(offset=-8) | M.GlobalTokens(0),
        q_len=32,
        kv_len=48,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        seed=12,
    )


@pytest.mark.slow
def test_tpu_formulation_value_head_dim_differs():
    _check_direct(
        "tpu", mask=M.Fixed(16, 4), q_len=40, kv_len=40, num_heads=2, num_kv_heads=1, head_dim=24, v_head_dim=8, seed=13
    )


@pytest.mark.parametrize("platform", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_skipped_blocks_are_never_read(platform):
    # Causal with q_len 16 < kv_len 64 (top-left aligned): kv blocks 1..3 are skipped for every
    # row. Poisoning them with NaN must not change anything, forward or backward; a kernel that
    # touched them (even multiplying by p = 0) would produce NaN.
    mask = M.Causal()
    q, k, v = random_qkv(20, batch=1, q_len=16, kv_len=64, num_heads=2, num_kv_heads=1, head_dim=16)
    k_bad = k.at[:, 16:].set(jnp.nan)
    v_bad = v.at[:, 16:].set(jnp.nan)

    def f(q, k, v):
        out = pallas.pallas_attention(
            q,
            k,
            v,
            mask=mask,
            segment_ids=None,
            scale=0.25,
            block_q=16,
            block_k=16,
            return_lse=False,
            interpret=True,
            platform=platform,
        )
        return jnp.sum(out * out), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k_bad, v_bad)
    ref = reference_attention(q, k[:, :16], v[:, :16], mask=mask, scale=0.25)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    assert bool(jnp.isfinite(grads[0]).all())
    assert bool((grads[1][:, 16:] == 0).all()) and bool((grads[2][:, 16:] == 0).all())


def test_repeat_is_bitwise_equal():
    q, k, v = random_qkv(30, batch=1, q_len=32, kv_len=32, num_heads=2, num_kv_heads=2, head_dim=16)
    f = jax.jit(
        lambda q, k, v: pallas.pallas_attention(
            q,
            k,
            v,
            mask=M.Causal(),
            segment_ids=None,
            scale=0.25,
            block_q=16,
            block_k=16,
            return_lse=True,
            interpret=True,
        )
    )
    a, b = f(q, k, v), f(q, k, v)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_q=12), "block_q"),
        (dict(block_k=0), "block_k"),
        (dict(platform="cuda"), "platform"),
        (dict(platform="gpu", block_q=24), "power of two"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    q, k, v = random_qkv(0, batch=1, q_len=16, kv_len=16, num_heads=2, num_kv_heads=1, head_dim=8)
    args = dict(mask=M.Causal(), segment_ids=None, scale=1.0, block_q=16, block_k=16, return_lse=False, interpret=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pallas.pallas_attention(q, k, v, **args)


def test_rejects_bad_head_grouping():
    q, k, v = random_qkv(0, batch=1, q_len=16, kv_len=16, num_heads=3, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        pallas.pallas_attention(
            q,
            k,
            v,
            mask=M.Causal(),
            segment_ids=None,
            scale=1.0,
            block_q=16,
            block_k=16,
            return_lse=False,
            interpret=True,
        )


# ----------------------------------------------------------------------------------------------
# Lowering for real hardware from this CPU host (jax.export; no accelerator needed).

# Mosaic lowering of some integer ops (the sign fix-up of // and %) asks which TPU generation it
# targets; with no TPU attached, name one through an abstract mesh.
_TPU_MESH = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
)

_EXPORT_MASKS = [
    M.Causal() & M.SlidingWindow(128, 0),
    M.Strided(64),
    M.Fixed(64, 8),
    M.Chunked(128),
    M.GlobalTokens(16) | M.SlidingWindow(64, 64),
]


def _export_train_step(platform, export_platform, mask, dtype, segments, block, dims=(1, 256, 384, 4, 2, 128, 128)):
    """Exports value_and_grad of a pallas attention loss; returns the StableHLO text.

    dims: (B, T, S, N, K, H, Hv).
    """
    b, t, s, n, kh, h, hv = dims

    def step(q, k, v, q_seg, kv_seg):
        def loss(q, k, v):
            out, lse = pallas.pallas_attention(
                q,
                k,
                v,
                mask=mask,
                segment_ids=(q_seg, kv_seg) if segments else None,
                scale=0.1,
                block_q=block,
                block_k=block,
                return_lse=True,
                interpret=False,
                platform=platform,
            )
            return out.astype(jnp.float32).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    args = (
        jax.ShapeDtypeStruct((b, t, n, h), dtype),
        jax.ShapeDtypeStruct((b, s, kh, h), dtype),
        jax.ShapeDtypeStruct((b, s, kh, hv), dtype),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
    )
    # Triton calls carry no cross-version compatibility guarantee, so export refuses them unless
    # told; that check is about serialized artifacts, not about whether the kernel lowers.
    disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exporter = jax.export.export(jax.jit(step), platforms=[export_platform], disabled_checks=disabled)
    if platform == "tpu":
        with jax.sharding.use_abstract_mesh(_TPU_MESH):
            return exporter(*args).mlir_module()
    return exporter(*args).mlir_module()


@pytest.mark.parametrize("mask", _EXPORT_MASKS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("segments", [False, True])
def test_tpu_mosaic_lowering(mask, segments):
    text = _export_train_step("tpu", "tpu", mask, jnp.bfloat16, segments, 128)
    # Forward, dq and dk/dv kernels, each a Mosaic custom call.
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 3


def test_tpu_mosaic_lowering_small_blocks_float32():
    # Small tiles with segments: the segment tiles are shaped so any multiple of 8 is legal.
    text = _export_train_step("tpu", "tpu", M.Causal(), jnp.float32, True, 16)
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 3


@pytest.mark.parametrize("mask", _EXPORT_MASKS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("segments", [False, True])
def test_gpu_triton_lowering(mask, segments):
    text = _export_train_step("gpu", "cuda", mask, jnp.bfloat16, segments, 64)
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize(
    "platform, export_platform, custom_call",
    [("tpu", "tpu", "@tpu_custom_call"), ("gpu", "cuda", "@__gpu$xla.gpu.triton")],
)
def test_lowering_odd_shapes(platform, export_platform, custom_call):
    # Lengths that are not block multiples, MQA with 8 query heads, H = 64 and Hv = 80 (padded to
    # 128 for Triton), segment ids.
    text = _export_train_step(
        platform, export_platform, M.Fixed(32, 4), jnp.bfloat16, True, 64, dims=(2, 200, 300, 8, 1, 64, 80)
    )
    assert text.count(f"stablehlo.custom_call {custom_call}") == 3


# ----------------------------------------------------------------------------------------------
# Bigger sweep (CI).


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_sweep_slow(platform, dtype, name):
    _check_direct(
        platform,
        mask=MASKS[name],
        q_len=72,
        kv_len=96,
        num_heads=4,
        num_kv_heads=1,
        head_dim=64,
        segment_ids=(random_segment_ids(1, 2, 72), random_segment_ids(2, 2, 96)),
        block_q=16,
        block_k=32,
        dtype=dtype,
        seed=40,
    )
