"""Llama-style Transformer stacks: a causal LM and a bidirectional encoder (classifier / embedder).

Each block is pre-RMSNorm: x += attn(norm(x)); x += ffn(norm(x)). Feed-forward widths come per layer
(`model.ffn_width` may be a list), because pruning and MatFormer change them layer by layer. With a
`model.moe` group the layers it names use a mixture-of-experts feed-forward (effitrans.layers.moe) instead
of the dense GLU (whose width, ffn_width, those layers then do not use).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.attention import build_attention
from effitrans.cascades.exit_heads import EXIT_KEYS, ExitHeads
from effitrans.layers import Embed, GLUFeedForward, RMSNorm
from effitrans.layers.glu import ACTIVATIONS
from effitrans.layers.moe import MOE_KEYS, MoEFeedForward, moe_problems
from effitrans.layers.params import fan_in_normal, init_param
from effitrans.layers.rope import ROPE_LAYOUTS
from effitrans.schema import (
    NOT_SET,
    ConfigError,
    Key,
    boolean,
    float_at_least,
    int_at_least,
    int_or_int_list,
    one_of,
    optional,
    value,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
POOLINGS = ("cls", "mean")
# Activation rematerialisation of each block in training: none, full (only the block input is saved), or
# dots_saveable (matmul outputs are saved, the elementwise work between them is recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}

# The keys of config.model these stacks read (name, attention and funnel: effitrans.registry.model_keys).
MODEL_KEYS = {
    "vocab_size": Key(261, int_at_least(1), "byte-level: 256 bytes + PAD, BOS, EOS, CLS, MASK (data.tokenizer)"),
    "d_model": Key(128, int_at_least(1), "residual width D"),
    "num_layers": Key(2, int_at_least(1), "Transformer blocks"),
    "num_heads": Key(4, int_at_least(1), "query heads N"),
    "num_kv_heads": Key(4, int_at_least(1), "key/value heads K: = N is MHA, 1 is MQA, a divisor of N is GQA"),
    "head_dim": Key(32, int_at_least(2), "H"),
    "ffn_width": Key(384, int_or_int_list, "GLU width F: an int, or one per layer", object),
    "ffn_activation": Key("silu", one_of(*ACTIVATIONS), "silu (SwiGLU) | gelu | relu"),
    "tie_embeddings": Key(True, boolean, "LM head shares the embedding table"),
    "rope_base": Key(10000.0, optional(float_at_least(0.0, strict=True)), "RoPE wavelength base; None disables RoPE"),
    "rope_layout": Key("half", one_of(*ROPE_LAYOUTS), "half (rotate-half, HF Llama) | interleaved (GGUF)"),
    "norm_eps": Key(1e-6, float_at_least(0.0, strict=True), "RMSNorm epsilon"),
    "dtype": Key("float32", one_of(*DTYPES), "compute dtype of activations (params stay float32)"),
    "pooling": Key(NOT_SET, one_of(*POOLINGS), "encoders: sequence -> vector by the CLS token or a masked mean"),
    "num_classes": Key(NOT_SET, int_at_least(2), "classifiers: output classes"),
    "embed_dim": Key(NOT_SET, int_at_least(1), "embedding encoders: output width"),
    "moe": Key(NOT_SET, MOE_KEYS, "mixture-of-experts feed-forward in the layers it names (effitrans.layers.moe)"),
    "scan_layers": Key(False, boolean, "run the blocks as one lax.scan (compiled once, not once per layer)"),
    "remat": Key(
        "none", one_of(*REMAT_POLICIES), "recompute block activations in the backward: none | full | dots_saveable"
    ),
    "exits": Key(NOT_SET, EXIT_KEYS, "early-exit heads on intermediate layers (effitrans.cascades, docs/cascades.md)"),
}


def compute_dtype(model_cfg):
    """The activation dtype named by model_cfg.dtype (params stay float32)."""
    return DTYPES[model_cfg.dtype]


def ffn_widths(model_cfg) -> list[int]:
    """Per-layer feed-forward widths: model.ffn_width as an int (all layers) or a list of num_layers ints."""
    w = model_cfg.ffn_width
    if isinstance(w, int):
        return [w] * model_cfg.num_layers
    return [int(x) for x in w]


def moe_options(model_cfg, layer: int | None = None) -> dict:
    """The MoEFeedForward arguments of model.moe (keys left out or None take their declared default). With a
    per-layer num_experts list, `layer` picks that layer's count (None: the first MoE layer's)."""
    o = {k: value(model_cfg.moe, MOE_KEYS, k) for k in MOE_KEYS if k != "layers"}
    if not isinstance(o["num_experts"], int):
        order = sorted(moe_layers(model_cfg))
        o["num_experts"] = int(o["num_experts"][0 if layer is None else order.index(layer)])
    return o


def moe_layers(model_cfg) -> frozenset[int]:
    """Indices of the layers with an MoE feed-forward: model.moe.layers, every layer when it is None, none
    without a model.moe group."""
    if "moe" not in model_cfg:
        return frozenset()
    layers = model_cfg.moe.get("layers")
    return frozenset(range(model_cfg.num_layers) if layers is None else (int(i) for i in layers))


def check_moe_config(model_cfg, prefix: str = "config.model") -> None:
    """model.moe's values fit together (top_k <= num_experts, groups, capacity) and name existing layers."""
    if "moe" not in model_cfg:
        return
    layers, n = model_cfg.moe.get("layers"), model_cfg.num_layers
    if layers is not None and len(set(layers)) != len(layers):
        raise ConfigError(f"{prefix}.moe.layers={list(layers)} names a layer twice; expected distinct indices")
    for i in layers or ():
        if i >= n:
            raise ConfigError(
                f"{prefix}.moe.layers={list(layers)} names layer {i}, but {prefix}.num_layers={n}: "
                f"allowed layer indices are 0..{n - 1}"
            )
    experts = model_cfg.moe.get("num_experts")
    per_layer = isinstance(experts, (list, tuple))
    if per_layer and len(experts) != len(moe_layers(model_cfg)):
        raise ConfigError(
            f"{prefix}.moe.num_experts={list(experts)} has {len(experts)} entries for {len(moe_layers(model_cfg))} "
            f"MoE layers: expected an int or one count per MoE layer"
        )
    for layer in sorted(moe_layers(model_cfg)) if per_layer else [None]:
        o = moe_options(model_cfg, layer)
        problems = moe_problems(o["num_experts"], o["top_k"], o["num_groups"], o["top_groups"], o["capacity_factor"])
        for _, msg in problems:
            raise ConfigError(f"{prefix}.moe.{msg}" + ("" if layer is None else f" in layer {layer}"))


class Block(nnx.Module):
    """One pre-norm Transformer block around an attention module of any family; the feed-forward is a dense
    GLU of width `ffn_width`, or with `moe` (its `moe_options`) an MoEFeedForward."""

    def __init__(self, model_cfg, ffn_width: int, *, causal: bool, rngs: nnx.Rngs, moe: dict | None = None):
        dtype = compute_dtype(model_cfg)
        self.attn_norm = RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps, rngs=rngs)
        self.attn = build_attention(model_cfg, causal=causal, rngs=rngs, dtype=dtype)
        self.ffn_norm = RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps, rngs=rngs)
        if moe:
            self.ffn = MoEFeedForward(
                model_cfg.d_model, activation=model_cfg.ffn_activation, rngs=rngs, dtype=dtype, **moe
            )
        else:
            self.ffn = GLUFeedForward(
                model_cfg.d_model, ffn_width, activation=model_cfg.ffn_activation, rngs=rngs, dtype=dtype
            )

    def __call__(
        self, x, *, positions, segment_ids=None, kv_x=None, kv_positions=None, cache=None, decode=False, token_mask=None
    ):
        """x [B, T, D] -> (x [B, T, D], cache). token_mask bool [B, T]: the real tokens an MoE feed-forward routes
        (None: segment ids != 0 when they are one array, the Encoder's padding convention; else every token)."""
        h, cache = self.attn(
            self.attn_norm(x),
            positions=positions,
            segment_ids=segment_ids,
            kv_x=None if kv_x is None else self.attn_norm(kv_x),
            kv_positions=kv_positions,
            cache=cache,
            decode=decode,
        )
        x = x + h
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoEFeedForward):
            if token_mask is None and segment_ids is not None and not isinstance(segment_ids, tuple):
                token_mask = segment_ids != 0
            x = x + self.ffn(h, valid=token_mask, decode=decode)
        else:
            x = x + self.ffn(h)
        return x, cache


class TransformerStack(nnx.Module):
    """Token embedding, `num_layers` blocks and a final norm; shared by every model below."""

    def __init__(self, model_cfg, *, causal: bool, rngs: nnx.Rngs):
        moe = moe_layers(model_cfg)
        self.scan_layers = bool(model_cfg.get("scan_layers", False))
        self.remat = model_cfg.get("remat", "none")
        if self.scan_layers and (moe or len(set(ffn_widths(model_cfg))) > 1):
            raise ConfigError(
                "config.model.scan_layers=True needs homogeneous layers: one ffn_width for all layers and no "
                f"model.moe (got ffn_width={model_cfg.ffn_width!r}, moe layers {sorted(moe)})"
            )
        self.dtype = compute_dtype(model_cfg)
        self.embed = Embed(model_cfg.vocab_size, model_cfg.d_model, rngs=rngs, dtype=self.dtype)
        self.blocks = nnx.List(
            [
                Block(model_cfg, w, causal=causal, rngs=rngs, moe=moe_options(model_cfg, i) if i in moe else None)
                for i, w in enumerate(ffn_widths(model_cfg))
            ]
        )
        self.final_norm = RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps, rngs=rngs)
        if "exits" in model_cfg:  # read by effitrans.cascades.early_exit; the plain forward ignores them
            self.exits = ExitHeads(model_cfg, rngs=rngs)

    def __call__(self, tokens, *, positions=None, segment_ids=None, caches=None, decode=False):
        """tokens int [B, T] -> (hidden [B, T, D], caches: list per layer or None)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = self.embed(tokens)  # [B, T, D]
        if caches is None and not decode and (self.scan_layers or self.remat != "none"):
            return self.final_norm(self._scanned_or_remat(x, positions, segment_ids)), None
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, c = block(
                x,
                positions=positions,
                segment_ids=segment_ids,
                cache=None if caches is None else caches[i],
                decode=decode,
            )
            new_caches.append(c)
        return self.final_norm(x), (new_caches if caches is not None else None)

    def _scanned_or_remat(self, x, positions, segment_ids):
        """The training/prefill path of model.scan_layers and model.remat: x [B, T, D] -> [B, T, D].

        The blocks stay separate modules (checkpoints, sharding and pruning see the same parameters); for the
        scan their states are stacked on a leading layer axis and one block body runs under lax.scan.
        """
        policy = REMAT_POLICIES[self.remat]

        def apply(graphdef, state, x):
            block = nnx.merge(graphdef, state)
            y, _ = block(x, positions=positions, segment_ids=segment_ids)
            after = nnx.state(block)
            if jax.tree.structure(after) != jax.tree.structure(state):
                raise ValueError(
                    f"config.model.scan_layers / remat={self.remat!r} need blocks whose call adds no variables "
                    "(reported metrics or state updates: MoE, routing, LSH attention); use the defaults"
                )
            return y

        if self.remat != "none":
            apply = jax.checkpoint(apply, policy=policy, static_argnums=(0,))
        if not self.scan_layers:
            for block in self.blocks:
                graphdef, state = nnx.split(block)
                x = apply(graphdef, state, x)
            return x
        splits = [nnx.split(block) for block in self.blocks]
        graphdef = splits[0][0]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[state for _, state in splits])  # [L, ...]

        def body(x, state):
            return apply(graphdef, state, x), None

        x, _ = jax.lax.scan(body, x, stacked)
        return x


def _positions_from_cache(tokens, caches):
    """During decode, token t of row b sits at position lengths[b] + t."""
    offsets = caches[0].lengths[:, None]  # [B, 1]
    return offsets + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]  # [B, T]


class CausalLM(nnx.Module):
    """Decoder-only language model. __call__(tokens [B, T]) -> (logits [B, T, V] float32, caches)."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        self.stack = TransformerStack(model_cfg, causal=True, rngs=rngs)
        self.tie_embeddings = bool(model_cfg.tie_embeddings)
        if not self.tie_embeddings:
            self.lm_head = init_param(
                rngs, (model_cfg.d_model, model_cfg.vocab_size), ("embed", "vocab"), fan_in_normal()
            )

    @property
    def blocks(self):
        return self.stack.blocks

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> list:
        """One cache per layer (a pytree: its byte size is the model's KV-cache size)."""
        return [b.attn.init_cache(batch, max_len, dtype) for b in self.stack.blocks]

    def logits(self, hidden):
        if self.tie_embeddings:
            return self.stack.embed.attend(hidden).astype(jnp.float32)
        return jnp.einsum("BTD,DV->BTV", hidden, self.lm_head[...].astype(hidden.dtype)).astype(jnp.float32)

    def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None, decode=False):
        if decode and positions is None:
            positions = _positions_from_cache(tokens, cache)
        hidden, cache = self.stack(tokens, positions=positions, segment_ids=segment_ids, caches=cache, decode=decode)
        return self.logits(hidden), cache


def pool(hidden, mask, pooling: str):
    """hidden [B, T, D], mask [B, T] (1 = token) -> [B, D] by the CLS token (position 0) or a masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.astype(hidden.dtype)[..., None]  # [B, T, 1]
        return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    raise ValueError(f"config.model.pooling={pooling!r} is not one of {POOLINGS}")


class Encoder(nnx.Module):
    """Bidirectional encoder. encode(tokens [B, T], mask [B, T]) -> hidden [B, T, D].

    Padding is kept out of attention with segment ids (1 = token, 0 = padding), so real tokens never
    attend to padding and no S x S mask is built.
    """

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        self.pooling = model_cfg.pooling
        self.stack = TransformerStack(model_cfg, causal=False, rngs=rngs)

    @property
    def blocks(self):
        return self.stack.blocks

    def encode(self, tokens, mask):
        hidden, _ = self.stack(tokens, segment_ids=mask.astype(jnp.int32))
        return hidden

    def pooled(self, tokens, mask):
        """[B, D] summary of each sequence by model.pooling."""
        return pool(self.encode(tokens, mask), mask, self.pooling)


class EncoderClassifier(Encoder):
    """__call__(tokens, mask) -> class logits [B, num_classes] float32."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        super().__init__(model_cfg, rngs=rngs)
        self.head = init_param(rngs, (model_cfg.d_model, model_cfg.num_classes), ("embed", None), fan_in_normal())

    def __call__(self, tokens, mask):
        h = self.pooled(tokens, mask)  # [B, D]
        return jnp.einsum("BD,DC->BC", h, self.head[...].astype(h.dtype)).astype(jnp.float32)


class EmbeddingEncoder(Encoder):
    """__call__(tokens, mask) -> unit-norm embeddings [B, embed_dim] float32 (for retrieval)."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        super().__init__(model_cfg, rngs=rngs)
        self.proj = init_param(rngs, (model_cfg.d_model, model_cfg.embed_dim), ("embed", None), fan_in_normal())

    def __call__(self, tokens, mask):
        h = self.pooled(tokens, mask)
        e = jnp.einsum("BD,DE->BE", h, self.proj[...].astype(h.dtype)).astype(jnp.float32)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-6)
