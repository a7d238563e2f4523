"""Funnel Transformer (Dai et al., 2020): sequence pooling, FunnelEncoder, upsampling decoder, surgery.

    from effitrans import funnel
    f = funnel.insert(trained_encoder, at_layer=2, stride=2)     # no weight changes
    cfg = funnel.funnel_config(config.model, at_layer=2, stride=2)  # same model from a config

See docs/funnel.md.
"""

from effitrans.funnel.config import FUNNEL_KEYS, check_funnel_config
from effitrans.funnel.decoder import FunnelDecoder, FunnelMaskedLM, mask_tokens, masked_lm_loss
from effitrans.funnel.encoder import (
    FunnelEmbeddingEncoder,
    FunnelEncoder,
    FunnelEncoderClassifier,
    FunnelSpec,
    funnel_forward,
    spec_from_config,
)
from effitrans.funnel.pooling import pool_mask, pool_positions, pool_sequence, pooled_length, upsample
from effitrans.funnel.surgery import FUNNEL_NAMES, funnel_config, insert, surgery_spec

__all__ = [
    "FUNNEL_KEYS",
    "FUNNEL_NAMES",
    "FunnelDecoder",
    "FunnelEmbeddingEncoder",
    "FunnelEncoder",
    "FunnelEncoderClassifier",
    "FunnelMaskedLM",
    "FunnelSpec",
    "check_funnel_config",
    "funnel_config",
    "funnel_forward",
    "insert",
    "mask_tokens",
    "masked_lm_loss",
    "pool_mask",
    "pool_positions",
    "pool_sequence",
    "pooled_length",
    "spec_from_config",
    "surgery_spec",
    "upsample",
]
