"""Cross-check: effitrans MLA equals HF transformers' PyTorch DeepseekV3Attention with ported weights.

Needs torch and transformers in the venv (CI: `pip install torch==2.13.0 transformers`); skips otherwise.
Covers the full-rank and low-rank query paths, interleaved RoPE and YaRN (factor, mscale, mscale_all_dim),
both MLA paths, and cached absorbed decoding against HF's full forward.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="torch not installed (CI: pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (CI: pip install transformers)")
try:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
except ImportError as e:  # an old transformers without DeepSeek-V3
    pytest.skip(f"transformers {transformers.__version__} has no DeepseekV3Attention: {e}", allow_module_level=True)

from effitrans.attention import LatentAttention  # noqa: E402

D, N, C, H, R, V = 32, 4, 16, 8, 8, 6


def _hf_config(q_lora_rank, yarn):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.8,
            "mscale_all_dim": 1.0,
            "rope_theta": 10000.0,
        }
    return DeepseekV3Config(
        hidden_size=D,
        num_attention_heads=N,
        num_key_value_heads=N,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=C,
        qk_nope_head_dim=H,
        qk_rope_head_dim=R,
        v_head_dim=V,
        rope_interleave=True,
        max_position_embeddings=256,
        rope_parameters=rope,
        attn_implementation="eager",
        num_hidden_layers=1,
        vocab_size=10,
    )


def _port(attn, m: LatentAttention):
    """HF nn.Linear weights [out, in] -> effitrans einsum weights."""
    t = lambda w: jnp.asarray(w.detach().numpy())
    if attn.q_lora_rank is None:
        m.wq[...] = t(attn.q_proj.weight).T.reshape(D, N, H + R)
    else:
        m.wq_a[...] = t(attn.q_a_proj.weight).T
        m.q_norm[...] = t(attn.q_a_layernorm.weight)
        m.wq_b[...] = t(attn.q_b_proj.weight).T.reshape(-1, N, H + R)
    m.wkv_a[...] = t(attn.kv_a_proj_with_mqa.weight).T
    m.kv_norm[...] = t(attn.kv_a_layernorm.weight)
    kv_b = t(attn.kv_b_proj.weight).T.reshape(C, N, H + V)
    m.wk_b[...], m.wv_b[...] = kv_b[..., :H], kv_b[..., H:]
    m.wo[...] = t(attn.o_proj.weight).T.reshape(N, V, D)


@pytest.mark.parametrize(
    "q_lora_rank,yarn",
    [pytest.param(None, False, marks=pytest.mark.slow), pytest.param(12, True, marks=pytest.mark.slow)],
    ids=["q_full-rope", "q_lora-yarn"],
)
def test_matches_hf_deepseek_v3_attention(q_lora_rank, yarn):
    torch.manual_seed(0)
    cfg = _hf_config(q_lora_rank, yarn)
    attn = hf.DeepseekV3Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():  # non-trivial norm scales, so a missing or misplaced norm shows
        for norm in (attn.kv_a_layernorm, attn.q_a_layernorm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    b, t = 2, 40
    x = torch.randn(b, t, D)
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = hf.DeepseekV3RotaryEmbedding(cfg)(x, pos)
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        want = attn(x, position_embeddings=(cos, sin), attention_mask=mask)[0].numpy()

    rp = cfg.rope_parameters
    yarn_kw = (
        dict(
            yarn_factor=rp["factor"],
            yarn_original_max_len=rp["original_max_position_embeddings"],
            yarn_beta_fast=rp["beta_fast"],
            yarn_beta_slow=rp["beta_slow"],
            yarn_mscale=rp["mscale"],
            yarn_mscale_all_dim=rp["mscale_all_dim"],
        )
        if yarn
        else {}
    )
    m = LatentAttention(
        D,
        N,
        kv_lora_rank=C,
        qk_nope_head_dim=H,
        qk_rope_head_dim=R,
        v_head_dim=V,
        q_lora_rank=q_lora_rank,
        rope_layout="interleaved",
        impl="reference",
        norm_eps=cfg.rms_norm_eps,
        rngs=nnx.Rngs(params=0),
        **yarn_kw,
    )
    _port(attn, m)
    xj = jnp.asarray(x.numpy())
    pj = jnp.asarray(pos.numpy(), jnp.int32)
    for path in ("naive", "absorbed"):
        m.path = path
        got, _ = nnx.jit(lambda m, x: m(x, positions=pj))(m, xj)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=path)

    # Absorbed decoding over the latent cache: prefill 30, then 10 single tokens, against HF's full pass.
    m.path = "absorbed"
    step = nnx.jit(lambda m, x, p, c: m(x, positions=p, cache=c, decode=True))
    cache = m.init_cache(b, t)
    y, cache = step(m, xj[:, :30], pj[:, :30], cache)
    pieces = [y]
    for i in range(30, t):
        y, cache = step(m, xj[:, i : i + 1], pj[:, i : i + 1], cache)
        pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), want, atol=2e-5, rtol=1e-4)
