"""FunnelDecoder and a masked-token model: token-level outputs from a funnel encoder.

The compressed output [B, T', D] is upsampled back to full length (each pooled token repeated by the
total stride, CLS once when separate), the first block's full-length output is added as a residual,
and `decoder_layers` full-length blocks refine it (Dai et al., 2020, section 2.2; HF FunnelDecoder).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from effitrans.funnel import pooling as P
from effitrans.funnel.encoder import FunnelEncoder, funnel_forward
from effitrans.models.transformer import Block, ffn_widths


class FunnelDecoder(nnx.Module):
    """__call__(hidden [B, T', D], first [B, T, D], mask [B, T]) -> [B, T, D] (before any final norm)."""

    def __init__(self, model_cfg, num_layers: int, *, rngs: nnx.Rngs):
        width = ffn_widths(model_cfg)[-1]
        self.blocks = nnx.List([Block(model_cfg, width, causal=False, rngs=rngs) for _ in range(num_layers)])

    def __call__(self, hidden, first, mask, *, total_stride: int, separate_cls: bool = True):
        t = first.shape[1]
        x = P.upsample(hidden, total_stride, t, separate_cls=separate_cls) + first  # [B, T, D]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), mask.shape)  # [B, T]
        seg = mask.astype(jnp.int32)
        ids = (jnp.where(seg > 0, seg, 1), seg)  # key-only masking, as in the encoder
        for block in self.blocks:
            x, _ = block(x, positions=positions, segment_ids=ids, token_mask=seg > 0)  # [B, T, D]
        return x


class FunnelMaskedLM(FunnelEncoder):
    """Funnel encoder + decoder + tied LM head. __call__(tokens [B, T], mask) -> logits [B, T, V] float32.

    model_cfg.funnel.decoder_layers full-length layers follow the upsampling.
    """

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        super().__init__(model_cfg, rngs=rngs)
        self.decoder = FunnelDecoder(model_cfg, model_cfg.funnel.decoder_layers, rngs=rngs)

    def hidden_states(self, tokens, mask):
        """[B, T, D] after the decoder (before the final norm)."""
        hidden, _, first = funnel_forward(self.stack, self.spec, tokens, mask, return_first_block=True)
        return self.decoder(
            hidden, first, mask, total_stride=self.spec.total_stride, separate_cls=self.spec.separate_cls
        )

    def __call__(self, tokens, mask):
        h = self.stack.final_norm(self.hidden_states(tokens, mask))  # [B, T, D]
        return self.stack.embed.attend(h).astype(jnp.float32)  # [B, T, V]


def mask_tokens(key, tokens, mask, *, mask_id: int, rate: float = 0.15):
    """BERT-style corruption: (inputs [B, T], targets [B, T], weights [B, T]) with `rate` of real non-CLS
    tokens replaced by `mask_id`; weights mark the replaced positions."""
    pick = jax.random.bernoulli(key, rate, tokens.shape) & (mask > 0)
    pick = pick.at[:, 0].set(False)  # keep CLS
    inputs = jnp.where(pick, mask_id, tokens)
    return inputs, tokens, pick.astype(jnp.float32)


def masked_lm_loss(model, inputs, mask, targets, weights):
    """Mean cross-entropy over the weighted (masked) positions."""
    logits = model(inputs, mask)  # [B, T, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
