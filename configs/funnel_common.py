"""Defaults of the `model.funnel` group (effitrans.funnel), shared by every funnel config; allowed values
are in effitrans/funnel/config.py. Used with model.name = funnel_embedding | funnel_classifier.
"""

import ml_collections


def funnel(**overrides) -> ml_collections.ConfigDict:
    f = ml_collections.ConfigDict()
    # Layers per block; they must sum to model.num_layers. Block 0 runs at full length.
    f.block_layers = ml_collections.FieldReference([2, 4], field_type=object)
    # strides[i] pools the sequence before block i + 1 (one fewer than blocks); 1 = no pooling.
    f.strides = ml_collections.FieldReference([2], field_type=object)
    f.pooling = "mean"  # hidden-state pooling: mean | max | slice (first token of each window)
    f.separate_cls = True  # token 0 (CLS) is its own window, never pooled with other tokens
    f.truncate_seq = False  # drop a partial trailing window instead of pooling it over fewer tokens
    f.pool_q_only = True  # first pooled layer: pooled queries attend over the unpooled keys/values
    f.position_pooling = "first"  # RoPE position of a pooled token: first (window start, int) | mean (float)
    f.decoder_layers = 0  # full-length layers after upsampling (FunnelMaskedLM only)
    f.update(overrides)
    return f
