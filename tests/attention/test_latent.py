"""Multi-head Latent Attention: absorbed == naive, == a per-head reference from the paper's equations,
cached decode == full forward, the cache holds only [latent | rope key], YaRN, config checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.attention import LatentAttention, LatentCache, cache_bytes
from effitrans.attention.latent import rotate, yarn_frequencies, yarn_mscale
from effitrans.registry import build_model
from effitrans.schema import ConfigError
from tests.helpers import tiny_model_config

DIMS = dict(kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def _mla(path="naive", q_lora_rank=None, seed=0, **kw):
    return LatentAttention(
        24, 3, **{**DIMS, **kw}, q_lora_rank=q_lora_rank, path=path, impl="reference", rngs=nnx.Rngs(params=seed)
    )


def _inputs(b=2, t=7, d=24, seed=1):
    x = jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return x, positions


def _with_path(module, path):
    module.path = path
    return module


def reference_mla(m: LatentAttention, x, positions):
    """Per-head MLA straight from DeepSeek-V2 eqs. (37)-(47), numpy float64, causal."""
    w = lambda p: np.asarray(p[...], np.float64)
    x = np.asarray(x, np.float64)
    rms = lambda a, g: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + m.norm_eps) * g
    rope = lambda a: np.asarray(
        rotate(jnp.asarray(a, jnp.float32), positions, jnp.asarray(m.inv_freq, jnp.float32), m.rope_layout), np.float64
    )
    if m.q_lora_rank is None:
        q = np.einsum("btd,dnk->btnk", x, w(m.wq))
    else:
        q = np.einsum("btl,lnk->btnk", rms(x @ w(m.wq_a), w(m.q_norm)), w(m.wq_b))
    kv = x @ w(m.wkv_a)
    c = rms(kv[..., : m.kv_lora_rank], w(m.kv_norm))  # c^KV_t
    k_r = rope(kv[..., None, m.kv_lora_rank :])[:, :, 0]  # k^R_t, shared
    b, t, n = q.shape[0], q.shape[1], m.num_heads
    y = np.zeros((b, t, x.shape[-1]))
    for i in range(n):
        q_c, q_r = q[:, :, i, : m.nope_dim], rope(q[:, :, i : i + 1, m.nope_dim :])[:, :, 0]
        k_c = c @ w(m.wk_b)[:, i]  # k^C_{t,i} = W^UK_i c_t
        v_c = c @ w(m.wv_b)[:, i]  # v^C_{t,i} = W^UV_i c_t
        logits = (np.einsum("bth,bsh->bts", q_c, k_c) + np.einsum("btr,bsr->bts", q_r, k_r)) * m.scale
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        y += np.einsum("bts,bsv->btv", p, v_c) @ w(m.wo)[i]
    return y


@pytest.mark.parametrize(
    "q_lora_rank", [pytest.param(None, marks=pytest.mark.slow), 5], ids=["q_full", "q_lora"]
)  # ~13 s each: CI runs q_full
def test_naive_and_absorbed_equal_paper_reference(q_lora_rank):
    m = _mla(q_lora_rank=q_lora_rank)
    x, pos = _inputs()
    ref = reference_mla(m, x, pos)
    fwd = nnx.jit(lambda m, x: m(x, positions=pos)[0])
    naive = fwd(_with_path(m, "naive"), x)
    absorbed = fwd(_with_path(m, "absorbed"), x)
    np.testing.assert_allclose(naive, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(absorbed, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_absorbed_gradients_equal_naive():
    m = _mla(q_lora_rank=5, seed=3)
    x, pos = _inputs(seed=4)

    def loss(m, x, path):
        m.path = path
        return jnp.sum(jnp.sin(m(x, positions=pos)[0]))

    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)), static_argnums=2)
    gn = grad(m, x, "naive")
    ga = grad(m, x, "absorbed")
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gn)):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=5e-5)


def _latent_cfg(path, num_layers=1, impl="reference", **kw):
    return tiny_model_config(
        head_dim=8,
        num_layers=num_layers,
        attention={
            "kind": "latent",
            "impl": impl,
            "kv_lora_rank": 12,
            "qk_rope_head_dim": 4,
            "v_head_dim": 6,
            "mla_path": path,
            **kw,
        },
    )


# auto: naive full forward vs absorbed decode, through the blockwise (xla) kernels.
@pytest.mark.parametrize(
    "path,impl",
    [pytest.param("naive", "reference", marks=pytest.mark.slow), pytest.param("auto", "xla", marks=pytest.mark.slow)],
)
def test_cached_decode_reproduces_full_forward(path, impl):
    model = build_model(_latent_cfg(path, impl=impl, q_lora_rank=6), seed=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 61)
    full, _ = nnx.jit(lambda m, t: m(t))(model, tokens)  # [B, T, V]
    step = nnx.jit(lambda m, t, c: m(t, cache=c, decode=True))
    cache = model.init_cache(2, 13)
    logits, cache = step(model, tokens[:, :3], cache)  # prefill 3
    pieces = [logits]
    for t in range(3, 10):
        logits, cache = step(model, tokens[:, t : t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)
    assert all(isinstance(c, LatentCache) for c in cache)
    np.testing.assert_array_equal(cache[0].lengths, [10, 10])


def test_cache_holds_only_latent_and_rope_key():
    model = build_model(_latent_cfg("absorbed", q_lora_rank=6))
    cache = model.init_cache(3, 40, jnp.bfloat16)
    # (d_c + d_rope) * l elements per token, bf16, plus one int32 length per row and layer (l = 1 here).
    assert cache[0].kv.shape == (3, 40, 12 + 4)
    assert cache_bytes(cache) == (12 + 4) * 2 * 40 * 3 + 4 * 3
    # Parameters are all nnx.Param: the trainer's nnx.split(model, nnx.Param) takes the whole state.
    nnx.split(model, nnx.Param)


def test_yarn_frequencies_and_scale():
    plain = np.asarray(1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16), np.float32)
    f = yarn_frequencies(16, 10000.0, factor=40.0, original_max_len=4096)
    np.testing.assert_allclose(f[0], plain[0], rtol=1e-6)  # fast dims: extrapolated (unchanged)
    np.testing.assert_allclose(f[-1], plain[-1] / 40.0, rtol=1e-6)  # slow dims: interpolated
    assert np.all(np.diff(f) < 0)
    m = LatentAttention(
        24, 3, **DIMS, yarn_factor=40.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0, rngs=nnx.Rngs(params=0)
    )
    assert math.isclose(m.scale, (8 + 4) ** -0.5 * yarn_mscale(40.0, 1.0) ** 2)
    assert m.rope_gain == 1.0
    x, pos = _inputs()
    fwd = nnx.jit(lambda m, x: m(x, positions=pos)[0])
    y_naive = fwd(_with_path(m, "naive"), x)
    y_abs = fwd(_with_path(m, "absorbed"), x)
    np.testing.assert_allclose(y_abs, y_naive, atol=1e-5, rtol=1e-5)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="mla_path='fast'"):
        build_model(_latent_cfg("fast"))
    cfg = tiny_model_config(attention={"kind": "latent", "qk_rope_head_dim": 4})
    with pytest.raises(ValueError, match="kv_lora_rank is required"):
        build_model(cfg)
    with pytest.raises(ValueError, match="qk_rope_head_dim=3 must be even"):
        LatentAttention(
            8, 2, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=3, v_head_dim=4, rngs=nnx.Rngs(params=0)
        )
