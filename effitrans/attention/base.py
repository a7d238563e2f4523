"""What the attention families share: per-head projection weights, projecting (with RoPE), the output
projection and the protocol's argument guards (see docs/contracts.md for the protocol itself).

A family subclasses `AttentionBase` with its name (`kind=`, as in config.model.attention.kind), whether it
takes keys/values from another sequence (`cross_attention=`, the `kv_x` argument) and whether it decodes
with a cache (`decodes=`), e.g. `class LSHAttention(AttentionBase, kind="lsh")`; it creates
its weights with `_init_heads` / `_init_output`, and implements `_forward` (a full pass) and, when it
decodes, `_decode`; the protocol's `__call__` checks the arguments and picks one of the two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.params import fan_in_normal, init_param
from effitrans.layers.rope import apply_rope


class AttentionBase(nnx.Module):
    """Shared pieces; subclasses set `dtype` (compute dtype), `rope_base` (None: no RoPE) and `rope_layout`."""

    kind = "attention"  # the family's name in config.model.attention.kind (used in error messages)
    cross_attention = False  # accepts kv_x / kv_positions
    decodes = False  # has init_cache and decode=True

    def __init_subclass__(cls, *, kind: str | None = None, cross_attention=None, decodes=None, **kw):
        super().__init_subclass__(**kw)
        for name, value in (("kind", kind), ("cross_attention", cross_attention), ("decodes", decodes)):
            if value is not None:
                setattr(cls, name, value)

    def _init_heads(self, rngs: nnx.Rngs, names, d_model: int, num_heads: int, head_dim: int, *, axis="heads"):
        """One weight [D, num_heads, H] per name (in order, so init draws are reproducible), logical axes
        ("embed", axis, None)."""
        init = fan_in_normal((0,))
        for name in names:
            setattr(self, name, init_param(rngs, (d_model, num_heads, head_dim), ("embed", axis, None), init))

    def _init_output(self, rngs: nnx.Rngs, num_heads: int, head_dim: int, d_model: int, name: str = "o"):
        """The output weight [N, H, D], logical axes ("heads", None, "embed")."""
        w = init_param(rngs, (num_heads, head_dim, d_model), ("heads", None, "embed"), fan_in_normal((0, 1)))
        setattr(self, name, w)

    def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, N, H] rotated at positions [B, T]; unchanged when rope_base is None."""
        if self.rope_base is None:
            return x
        return apply_rope(x, positions, base=self.rope_base, layout=self.rope_layout)

    def _project(self, x: jax.Array, w: nnx.Param, positions: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] through w [D, N, H] in the compute dtype -> [B, T, N, H], RoPE'd when positions are given."""
        y = jnp.einsum("BTD,DNH->BTNH", x.astype(self.dtype), w[...].astype(self.dtype))  # [B, T, N, H]
        return y if positions is None else self._rope(y, positions)

    def _qkv(self, x: jax.Array, positions: jax.Array, kv_x: jax.Array | None = None, kv_positions=None):
        """q [B, T, N, H] from x, k and v [B, S, K, H] from kv_x (x when None); q and k RoPE'd."""
        src, src_positions = (x, positions) if kv_x is None else (kv_x, kv_positions)
        q = self._project(x, self.q, positions)  # [B, T, N, H]
        return q, self._project(src, self.k, src_positions), self._project(src, self.v)  # [B, S, K, H] x 2

    def _output(self, out: jax.Array, name: str = "o") -> jax.Array:
        """Per-head outputs [B, T, N, H] -> [B, T, D] through the output weight."""
        return jnp.einsum("BTNH,NHD->BTD", out.astype(self.dtype), getattr(self, name)[...].astype(self.dtype))

    def _check_call(self, *, kv_x=None, kv_positions=None, cache=None, decode: bool = False) -> None:
        """Rejects arguments of the protocol this family does not support, naming the argument."""
        if kv_x is not None:
            if not self.cross_attention:
                raise ValueError(f"{self.kind} attention is self-attention; kv_x is not supported")
            if kv_positions is None:
                raise ValueError("kv_x was given without kv_positions; pass the positions of the key/value tokens")
        if decode:
            if not self.decodes:
                raise ValueError(f"{self.kind} attention does not support decode (no cache)")
            if cache is None:
                raise ValueError("decode=True needs a cache; create one with init_cache(batch, max_len)")
            if kv_x is not None:
                raise ValueError("decode=True with kv_x is not supported: a cache holds self-attention keys")

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
        """Families without decode have no cache."""
        raise ValueError(f"{self.kind} attention does not support decode (no cache)")

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        kv_x: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        cache=None,
        decode: bool = False,
    ):
        """x [B, T, D], positions int [B, T] -> (y [B, T, D], cache).

        kv_x [B, S, D] (with kv_positions [B, S]) takes keys/values from another sequence (cross_attention
        families, e.g. a funnel's pooled queries over unpooled tokens). With decode=True, x holds the newest T
        tokens of each row; they are written to `cache` and attend to everything cached before them.
        """
        self._check_call(kv_x=kv_x, kv_positions=kv_positions, cache=cache, decode=decode)
        if decode:
            return self._decode(x, positions, cache)
        cross = {"kv_x": kv_x, "kv_positions": kv_positions} if self.cross_attention else {}
        return self._forward(x, positions, segment_ids, **cross), cache

    def _forward(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, **cross) -> jax.Array:
        """A full pass: x [B, T, D] -> y [B, T, D]."""
        raise NotImplementedError

    def _decode(self, x: jax.Array, positions: jax.Array, cache):
        """Decoding families: the newest tokens x [B, T, D] -> (y [B, T, D], updated cache)."""
        raise NotImplementedError
