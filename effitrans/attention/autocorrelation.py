"""Auto-correlation (Autoformer, Wu et al., 2021) as an attention family: kind "autocorrelation".

Queries, keys and values are projected per head as in every family (no RoPE: the mechanism compares a
series with shifted copies of itself, so absolute positions do not enter); the per-head outputs are
`effitrans.layers.series.autocorrelation_attention` with one delay set per row (the gather path, so a row's
output never depends on the other rows): the top int(factor ln T) delays of the FFT correlation, values
rolled by each and mixed with the softmax of their correlations. O(T log T) in the length.

What it cannot do, each a ValueError: causal masks (a correlation over all delays reads the whole series;
checked when built), segment ids (padding or packed rows: a roll would mix rows' segments), decode (no
cache), and GQA (queries and keys correlate head by head).
"""

from __future__ import annotations

import jax
from flax import nnx

from effitrans import schema
from effitrans.attention.base import AttentionBase
from effitrans.layers.series import autocorrelation_attention
from effitrans.schema import Key, float_at_least

AUTOCORRELATION_KEYS = {
    "autocorrelation_factor": Key(1.0, float_at_least(0.0, strict=True), "c: top int(c ln T) delays"),
}


class AutoCorrelationAttention(AttentionBase, kind="autocorrelation", cross_attention=True):
    """Weights: q, k, v [D, N, H], o [N, H, D] (no biases)."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, factor: float, rngs: nnx.Rngs, dtype):
        if not factor > 0:
            raise ValueError(f"factor={factor!r} must be > 0")
        self.factor, self.dtype, self.rope_base = factor, dtype, None
        self._init_heads(rngs, ("q", "k", "v"), d_model, num_heads, head_dim)
        self._init_output(rngs, num_heads, head_dim, d_model)

    def _forward(self, x, positions, segment_ids, kv_x=None, kv_positions=None) -> jax.Array:
        """x [B, T, D] (keys/values from kv_x [B, S, D]: cut or zero-padded to T) -> y [B, T, D]."""
        if segment_ids is not None:
            raise ValueError(
                "autocorrelation attention does not support segment_ids (padding or packed rows): pass "
                "segment_ids=None and unpadded series"
            )
        q, k, v = self._qkv(x, positions, kv_x, kv_positions)  # [B, T, N, H], [B, S, N, H] x 2
        out = autocorrelation_attention(q, k, v, factor=self.factor, per_row=True)  # [B, T, N, H] float32
        return self._output(out.astype(self.dtype))


def build_autocorrelation(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    """The family's builder (registered in effitrans/attention/__init__.py)."""
    del causal  # build_attention rejects causal=True for this family (AttentionFamily.supports_causal)
    if model_cfg.num_kv_heads != model_cfg.num_heads:
        raise ValueError(
            f"config.model.num_kv_heads={model_cfg.num_kv_heads} must equal config.model.num_heads="
            f"{model_cfg.num_heads} for config.model.attention.kind='autocorrelation' (heads correlate pairwise)"
        )
    factor = schema.value(attn_cfg, AUTOCORRELATION_KEYS, "autocorrelation_factor")
    return AutoCorrelationAttention(
        model_cfg.d_model, model_cfg.num_heads, model_cfg.head_dim, factor=factor, rngs=rngs, dtype=dtype
    )
