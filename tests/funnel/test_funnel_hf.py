"""Cross-check against HF transformers' PyTorch Funnel Transformer (FunnelModel, FunnelAttentionStructure).

What is compared, exactly:
1. Pooling: effitrans.funnel.pool_sequence / pool_mask against FunnelAttentionStructure.pool_tensor (mean,
   max, min) with separate_cls and truncate_seq; upsample against HF's `upsample`; pooled positions
   against `stride_pool_pos` (tokens after CLS; HF places CLS at 1 - 2**block for its relative
   attention, effitrans keeps CLS at its own position).
2. The whole FunnelModel wiring with ported weights: HF's FunnelModel runs its own encoder loop (which
   layer pools, pool_q_only query/key split, min-pooled attention masks, block sizes), decoder
   (upsampling by 2**(blocks-1), CLS separate, residual from the first block), while each HF FunnelLayer
   computes our pre-norm Llama block (RMSNorm, softmax attention without position encoding, SwiGLU)
   written here in torch from the definitions, with our model's weights. HF's own layer math (post-LN,
   relative-shift attention with r_w/r_r/r_s biases) has no counterpart in a RoPE/RMSNorm block, so it is
   replaced; its embedding LayerNorm likewise. The outputs must agree at every real token (padding rows
   differ by design: HF lets padded queries attend to real keys, effitrans masks by segment).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import FunnelConfig, FunnelModel  # noqa: E402
from transformers.models.funnel import modeling_funnel as hf  # noqa: E402

from effitrans import funnel  # noqa: E402
from effitrans.funnel import pooling as P  # noqa: E402
from tests.helpers import tiny_model_config  # noqa: E402


def _hf_config(**kw):
    base = dict(
        vocab_size=61,
        block_sizes=[2, 2, 2],
        num_decoder_layers=2,
        d_model=32,
        n_head=4,
        d_head=8,
        d_inner=48,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pooling_type="mean",
    )
    base.update(kw)
    return FunnelConfig(**base)


@pytest.mark.parametrize("separate_cls,truncate_seq,length", [(True, True, 12), (True, False, 11), (False, False, 9)])
def test_pooling_and_upsampling_match_hf(separate_cls, truncate_seq, length):
    structure = hf.FunnelAttentionStructure(_hf_config(separate_cls=separate_cls, truncate_seq=truncate_seq))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, length, 5)).astype(np.float32)
    mask = (np.arange(length)[None] < np.array([[length], [length - 3]])).astype(np.float32)
    kw = dict(separate_cls=separate_cls, truncate_seq=truncate_seq)
    for mode in ("mean", "max"):
        ours = np.asarray(P.pool_sequence(jnp.asarray(x), 2, mode=mode, **kw))
        theirs = structure.pool_tensor(torch.from_numpy(x), mode=mode, stride=2).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    ours = np.asarray(P.pool_mask(jnp.asarray(mask), 2, **kw))
    np.testing.assert_array_equal(ours, structure.pool_tensor(torch.from_numpy(mask), mode="min", stride=2).numpy())
    pos = list(range(length))
    theirs_pos = structure.stride_pool_pos(pos, block_index=1)
    ours_pos = np.asarray(P.pool_positions(jnp.asarray([pos]), 2, **kw))[0].tolist()
    if separate_cls:
        assert ours_pos[0] == 0 and ours_pos[1:] == theirs_pos[1:]
    else:
        assert ours_pos == theirs_pos
    pooled = rng.normal(size=(2, P.pooled_length(length, 4, **kw), 5)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(P.upsample(jnp.asarray(pooled), 4, length, separate_cls=separate_cls)),
        hf.upsample(torch.from_numpy(pooled), 4, length, separate_cls=separate_cls, truncate_seq=truncate_seq).numpy(),
    )


def _t(p):
    return torch.from_numpy(np.asarray(p[...], dtype=np.float32).copy())


def _rms(x, scale, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def _llama_layer_forward(block, eps):
    """An HF FunnelLayer.forward computing our pre-norm block (ported weights) on HF's query/key/value."""
    a, f = block.attn, block.ffn
    wq, wk, wv, wo = _t(a.q), _t(a.k), _t(a.v), _t(a.o)
    g, u, d = _t(f.gate), _t(f.up), _t(f.down)
    s_attn, s_ffn = _t(block.attn_norm.scale), _t(block.ffn_norm.scale)

    def forward(query, key, value, attention_inputs, output_attentions=False):
        kv_mask = attention_inputs[2]  # [B, S], HF's (pooled) key mask
        hq, hk = _rms(query, s_attn, eps), _rms(key, s_attn, eps)
        q = torch.einsum("btd,dnh->btnh", hq, wq)
        k = torch.einsum("bsd,dnh->bsnh", hk, wk)
        v = torch.einsum("bsd,dnh->bsnh", hk, wv)
        scores = torch.einsum("btnh,bsnh->bnts", q, k) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(kv_mask[:, None, None, :] == 0, -1e30)
        out = torch.einsum("bnts,bsnh->btnh", scores.softmax(-1), v)
        x = query + torch.einsum("btnh,nhd->btd", out, wo)
        h = _rms(x, s_ffn, eps)
        return (x + (torch.nn.functional.silu(h @ g) * (h @ u)) @ d,)

    return forward


@pytest.mark.parametrize(
    "truncate_seq,pool_q_only,length",
    [
        pytest.param(True, True, 16, marks=pytest.mark.slow),
        pytest.param(False, True, 15, marks=pytest.mark.slow),
        pytest.param(False, False, 14, marks=pytest.mark.slow),
    ],
)
def test_funnel_model_wiring_matches_hf_with_ported_weights(truncate_seq, pool_q_only, length):
    cfg = tiny_model_config(
        name="encoder_embedding",
        pooling="mean",
        embed_dim=8,
        num_layers=6,
        num_kv_heads=4,
        rope_base=None,
        attention={"impl": "reference"},
    )
    cfg = funnel.funnel_config(
        cfg, at_layer=2, stride=2, truncate_seq=truncate_seq, pool_q_only=pool_q_only, decoder_layers=2
    )
    cfg.funnel.block_layers, cfg.funnel.strides = [2, 2, 2], [2, 2]
    ours = funnel.FunnelMaskedLM(cfg, rngs=nnx.Rngs(params=3))

    model = FunnelModel(_hf_config(truncate_seq=truncate_seq, pool_q_only=pool_q_only, separate_cls=True)).eval()
    model.embeddings.layer_norm = torch.nn.Identity()
    model.embeddings.word_embeddings.weight.data = _t(ours.stack.embed.table)
    hf_layers = [layer for block in model.encoder.blocks for layer in block] + list(model.decoder.layers)
    our_blocks = list(ours.stack.blocks) + list(ours.decoder.blocks)
    for layer, block in zip(hf_layers, our_blocks, strict=True):
        layer.forward = _llama_layer_forward(block, cfg.norm_eps)

    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 61, size=(2, length))
    mask = (np.arange(length)[None] < np.array([[length], [length - 5]])).astype(np.int64)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).last_hidden_state
    got = np.asarray(ours.hidden_states(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)))
    assert got.shape == tuple(theirs.shape) == (2, length, 32)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], theirs.numpy()[real], rtol=1e-4, atol=1e-5)
