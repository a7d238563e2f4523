"""FunnelEncoder: a Transformer encoder whose sequence is pooled between blocks of layers.

`block_layers=[4, 4, 4]`, `strides=[2, 2]`: four layers at full length, the next four at 1/2, the last
four at 1/4. The first layer of every pooled block attends with pooled queries over the block's
unpooled keys/values (`pool_q_only`, HF's default), through the attention protocol's `kv_x`; its
residual is the pooled input. The parameters are exactly those of `models.transformer.Encoder`
(`stack.embed`, `stack.blocks[i]`, `stack.final_norm`, then the head), so a trained dense encoder
becomes a funnel without touching a weight (effitrans.funnel.surgery) and the same checkpoint loads
into either.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from effitrans.funnel import pooling as P
from effitrans.layers.params import fan_in_normal, init_param
from effitrans.models.transformer import TransformerStack, pool


@dataclasses.dataclass(frozen=True)
class FunnelSpec:
    """Static funnel layout. block_layers: layers per block; strides[i]: pooling before block i + 1."""

    block_layers: tuple
    strides: tuple
    pooling: str = "mean"  # hidden-state pooling: mean | max | slice
    separate_cls: bool = True  # token 0 (CLS) is never pooled with others
    truncate_seq: bool = False  # drop a partial trailing window instead of pooling it
    pool_q_only: bool = True  # first pooled layer: pooled queries over unpooled keys/values
    position_pooling: str = "first"  # RoPE positions of pooled tokens: first | mean

    def __post_init__(self):
        object.__setattr__(self, "block_layers", tuple(int(b) for b in self.block_layers))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        problems = spec_problems(self)
        if problems:
            raise ValueError(problems[0][1])

    @property
    def num_layers(self) -> int:
        return sum(self.block_layers)

    @property
    def total_stride(self) -> int:
        out = 1
        for s in self.strides:
            out *= s
        return out

    def pooled_lengths(self, length: int) -> list:
        """Sequence length in each block for an input of `length` (ValueError if one would be < 1)."""
        out = [length]
        for s in self.strides:
            out.append(P.pooled_length(out[-1], s, separate_cls=self.separate_cls, truncate_seq=self.truncate_seq))
        return out


def spec_problems(spec) -> list:
    """[(key, message)] for everything wrong with a spec's values (empty when fine)."""
    out = []
    bl, st = spec.block_layers, spec.strides
    if not bl or any(b < 1 for b in bl):
        out.append(("block_layers", f"block_layers={list(bl)} is not allowed: expected a non-empty list of ints >= 1"))
    if any(s < 1 for s in st):
        out.append(("strides", f"strides={list(st)} is not allowed: every stride must be an int >= 1"))
    if len(st) != max(len(bl) - 1, 0):
        out.append(
            (
                "strides",
                f"strides={list(st)} has {len(st)} entries but block_layers={list(bl)} has "
                f"{len(bl)} blocks; expected len(block_layers) - 1 = {max(len(bl) - 1, 0)} strides",
            )
        )
    if spec.pooling not in P.HIDDEN_POOL_MODES:
        out.append(("pooling", f"pooling={spec.pooling!r} is not one of {list(P.HIDDEN_POOL_MODES)}"))
    if spec.position_pooling not in P.POSITION_MODES:
        out.append(
            ("position_pooling", f"position_pooling={spec.position_pooling!r} is not one of {list(P.POSITION_MODES)}")
        )
    return out


def spec_from_config(model_cfg) -> FunnelSpec:
    """The FunnelSpec of `model_cfg.funnel` (keys: effitrans.funnel.FUNNEL_KEYS)."""
    f = model_cfg.funnel
    return FunnelSpec(
        block_layers=tuple(f.block_layers),
        strides=tuple(f.strides),
        pooling=f.pooling,
        separate_cls=f.separate_cls,
        truncate_seq=f.truncate_seq,
        pool_q_only=f.pool_q_only,
        position_pooling=f.position_pooling,
    )


def funnel_forward(stack: TransformerStack, spec: FunnelSpec, tokens, mask, *, return_first_block: bool = False):
    """tokens, mask int [B, T] -> (hidden [B, T', D] before the final norm, mask [B, T'][, first [B, T, D]]).

    `first` is the output of the first (full-length) block: the decoder's residual.
    """
    if len(stack.blocks) != spec.num_layers:
        raise ValueError(
            f"funnel block_layers={list(spec.block_layers)} sum to {spec.num_layers} layers but the "
            f"stack has {len(stack.blocks)}"
        )
    spec.pooled_lengths(tokens.shape[1])  # rejects pooling below one token
    kw = dict(separate_cls=spec.separate_cls, truncate_seq=spec.truncate_seq)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # [B, T]
    # Keys (and the output mask) use segment ids pooled by "min"; queries use ids pooled by "max", with
    # padding queries reading segment 1: HF's key-only masking. So a pooled token that covers real and
    # padding tokens is not a key, but its query state is meaningful, and so are the real tokens it
    # covers when the decoder upsamples it. Real tokens' outputs are the same either way.
    seg = mask.astype(jnp.int32)  # [B, T]
    q_seg = jnp.where(seg > 0, seg, 1)  # [B, T]
    x = stack.embed(tokens)  # [B, T, D]
    first = None
    layer = 0
    for b, n_layers in enumerate(spec.block_layers):
        for j in range(n_layers):
            block = stack.blocks[layer]
            layer += 1
            if b > 0 and j == 0:
                s = spec.strides[b - 1]
                px = P.pool_sequence(x, s, mode=spec.pooling, **kw)  # [B, T', D]
                ppos = P.pool_positions(positions, s, mode=spec.position_pooling, **kw)  # [B, T']
                pseg = P.pool_mask(seg, s, mode="min", **kw)  # [B, T']
                pq_seg = P.pool_mask(q_seg, s, mode="max", **kw)  # [B, T']
                # An MoE routes a pooled token that covers any real token.
                real = P.pool_mask(seg, s, mode="max", **kw) > 0  # [B, T']
                if spec.pool_q_only:
                    x, _ = block(
                        px, positions=ppos, segment_ids=(pq_seg, seg), kv_x=x, kv_positions=positions, token_mask=real
                    )
                else:
                    x, _ = block(px, positions=ppos, segment_ids=(pq_seg, pseg), token_mask=real)
                positions, seg, q_seg = ppos, pseg, pq_seg
            else:
                x, _ = block(x, positions=positions, segment_ids=(q_seg, seg), token_mask=seg > 0)  # [B, T', D]
        if b == 0:
            first = x
    out_mask = seg.astype(mask.dtype)
    return (x, out_mask, first) if return_first_block else (x, out_mask)


class FunnelEncoder(nnx.Module):
    """Funnel encoder. encode(tokens [B, T], mask [B, T]) -> (hidden [B, T', D], pooled mask [B, T']).

    Built from a config (`model.funnel` group) or, by surgery, around an existing TransformerStack
    (`stack=`, `spec=`, `pooling=`), sharing its parameters.
    """

    def __init__(
        self,
        model_cfg=None,
        *,
        rngs: nnx.Rngs | None = None,
        stack: TransformerStack | None = None,
        spec: FunnelSpec | None = None,
        pooling: str | None = None,
    ):
        self.stack = stack if stack is not None else TransformerStack(model_cfg, causal=False, rngs=rngs)
        self.spec = spec if spec is not None else spec_from_config(model_cfg)
        self.pooling = pooling if pooling is not None else model_cfg.pooling

    @property
    def blocks(self):
        return self.stack.blocks

    def encode(self, tokens, mask):
        hidden, pmask = funnel_forward(self.stack, self.spec, tokens, mask)
        return self.stack.final_norm(hidden), pmask

    def pooled(self, tokens, mask):
        """[B, D] summary over the pooled tokens (mean uses the pooled mask)."""
        hidden, pmask = self.encode(tokens, mask)
        return pool(hidden, pmask, self.pooling)

    @staticmethod
    def _head_weight(weight, model_cfg, width_key: str, rngs):
        """`weight` when given (surgery keeps the dense model's), else a new [D, model_cfg.<width_key>] one."""
        if weight is not None:
            return weight
        width = getattr(model_cfg, width_key)
        return init_param(rngs, (model_cfg.d_model, width), ("embed", None), fan_in_normal())

    def _pooled_through(self, tokens, mask, weight) -> jnp.ndarray:
        """The pooled summary [B, D] through weight [D, F] -> float32 [B, F]."""
        h = self.pooled(tokens, mask)  # [B, D]
        return jnp.einsum("BD,DF->BF", h, weight[...].astype(h.dtype)).astype(jnp.float32)


class FunnelEmbeddingEncoder(FunnelEncoder):
    """Funnel version of EmbeddingEncoder: __call__(tokens, mask) -> unit-norm [B, embed_dim] float32."""

    def __init__(self, model_cfg=None, *, rngs=None, stack=None, spec=None, pooling=None, proj=None):
        super().__init__(model_cfg, rngs=rngs, stack=stack, spec=spec, pooling=pooling)
        self.proj = self._head_weight(proj, model_cfg, "embed_dim", rngs)

    def __call__(self, tokens, mask):
        e = self._pooled_through(tokens, mask, self.proj)  # [B, E]
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-6)


class FunnelEncoderClassifier(FunnelEncoder):
    """Funnel version of EncoderClassifier: __call__(tokens, mask) -> logits [B, num_classes] float32."""

    def __init__(self, model_cfg=None, *, rngs=None, stack=None, spec=None, pooling=None, head=None):
        super().__init__(model_cfg, rngs=rngs, stack=stack, spec=spec, pooling=pooling)
        self.head = self._head_weight(head, model_cfg, "num_classes", rngs)

    def __call__(self, tokens, mask):
        return self._pooled_through(tokens, mask, self.head)  # [B, C]
