"""Cross-check: effitrans TGA equals HF transformers' PyTorch LongT5TransientGlobalAttention with ported weights.

Needs torch and transformers (CI: `pip install torch==2.13.0 transformers`); skips otherwise. Covers a full
mask, right padding (padding excluded from the global sums), orphan tokens (a real length that is not a
multiple of global_block), a sequence length that is not a multiple of the local block, and non-trivial
global-norm scales. T5 folds 1/sqrt(H) into W_q, so the port multiplies W_q by sqrt(H).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="torch not installed (CI: pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="transformers not installed (CI: pip install transformers)")
try:
    from transformers import LongT5Config
    from transformers.models.longt5 import modeling_longt5 as hf
except ImportError as e:  # pragma: no cover
    pytest.skip(f"transformers {transformers.__version__} has no LongT5: {e}", allow_module_level=True)

from effitrans.attention.transient_global import TransientGlobalAttention  # noqa: E402

D, N, H = 24, 3, 8


def _port(attn, m: TransientGlobalAttention):
    t = lambda w: jnp.asarray(w.detach().numpy())
    m.q[...] = t(attn.q.weight).T.reshape(D, N, H) * np.sqrt(H)
    m.k[...] = t(attn.k.weight).T.reshape(D, N, H)
    m.v[...] = t(attn.v.weight).T.reshape(D, N, H)
    m.o[...] = t(attn.o.weight).T.reshape(N, H, D)
    m.global_norm[...] = t(attn.global_input_layer_norm.weight)
    m.local_bias[...] = t(attn.relative_attention_bias.weight)
    m.global_bias[...] = t(attn.global_relative_attention_bias.weight)


@pytest.mark.parametrize(
    "seq_len,local_radius,global_block,real_lens",
    [
        pytest.param(24, 3, 4, (24, 24), marks=pytest.mark.slow),  # full mask, S a multiple of both blocks
        pytest.param(
            30, 4, 6, (30, 17), marks=pytest.mark.slow
        ),  # right padding with orphans (17 = 2 * 6 + 5); S % (r + 1) == 0
        pytest.param(28, 5, 4, (28, 11), marks=pytest.mark.slow),  # S not a multiple of the local block
    ],
    ids=["full", "padding-orphans", "ragged-local-block"],
)
def test_matches_hf_longt5_transient_global(seq_len, local_radius, global_block, real_lens):
    torch.manual_seed(0)
    cfg = LongT5Config(
        d_model=D,
        d_kv=H,
        num_heads=N,
        local_radius=local_radius,
        global_block_size=global_block,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=20,
        encoder_attention_type="transient-global",
        dropout_rate=0.0,
        is_decoder=False,
    )
    attn = hf.LongT5TransientGlobalAttention(cfg, has_relative_attention_bias=True).eval()
    with torch.no_grad():
        attn.global_input_layer_norm.weight.uniform_(0.5, 1.5)
        attn.relative_attention_bias.weight.normal_(0.0, 0.5)
        attn.global_relative_attention_bias.weight.normal_(0.0, 0.5)
    m = TransientGlobalAttention(
        D,
        N,
        H,
        local_radius=local_radius,
        global_block=global_block,
        causal=False,
        num_buckets=16,
        max_distance=20,
        rngs=nnx.Rngs(params=0),
    )
    _port(attn, m)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, seq_len, D)).astype(np.float32)
    mask = np.zeros((2, seq_len), np.int32)
    for b, n in enumerate(real_lens):
        mask[b, :n] = 1
    with torch.no_grad():
        want = attn(torch.from_numpy(x), mask=torch.from_numpy(mask).float())[0].numpy()
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (2, seq_len))
    got, _ = m(jnp.asarray(x), positions=positions, segment_ids=jnp.asarray(mask))
    got = np.asarray(got)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=1e-5)
