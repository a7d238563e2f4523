"""Funnel surgery: turn a trained dense encoder into a funnel encoder without changing any weight.

    funnel_model = funnel.insert(model, at_layer=k, stride=s, pooling="mean")

Layers 0..k-1 keep the full sequence; layer k is the first pooled layer (pooled queries over the
unpooled keys/values when pool_q_only), layers k+1.. run on the pooled sequence. The new module shares
the original's parameter Variables (same objects, same tree paths), so `nnx.state(funnel_model,
nnx.Param)` is the original state and a checkpoint of either loads into the other. `funnel_config`
gives the matching config, for recovery fine-tuning or training the same funnel from scratch.
"""

from __future__ import annotations

import copy

from effitrans.funnel.encoder import FunnelEmbeddingEncoder, FunnelEncoder, FunnelEncoderClassifier, FunnelSpec
from effitrans.models.transformer import EmbeddingEncoder, Encoder, EncoderClassifier

# Dense model name -> funnel model name (effitrans.registry.MODELS).
FUNNEL_NAMES = {"encoder_embedding": "funnel_embedding", "encoder_classifier": "funnel_classifier"}


def surgery_spec(
    num_layers: int,
    *,
    at_layer: int,
    stride: int,
    pooling: str = "mean",
    separate_cls: bool = True,
    truncate_seq: bool = False,
    pool_q_only: bool = True,
    position_pooling: str = "first",
) -> FunnelSpec:
    """The two-block spec of a funnel inserted before layer `at_layer` of a `num_layers`-layer encoder."""
    if not isinstance(at_layer, int) or not 1 <= at_layer <= num_layers - 1:
        raise ValueError(
            f"at_layer={at_layer!r} is not allowed for a {num_layers}-layer encoder: expected an int in "
            f"[1, {num_layers - 1}] (layers before it keep the full sequence, at least one runs pooled)"
        )
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride={stride!r} is not allowed: expected an int >= 1")
    return FunnelSpec(
        block_layers=(at_layer, num_layers - at_layer),
        strides=(stride,),
        pooling=pooling,
        separate_cls=separate_cls,
        truncate_seq=truncate_seq,
        pool_q_only=pool_q_only,
        position_pooling=position_pooling,
    )


def insert(model, *, at_layer: int, stride: int, **options) -> FunnelEncoder:
    """A funnel version of the dense encoder `model` sharing all of its parameters (none is changed).

    options: surgery_spec's keywords (pooling, separate_cls, truncate_seq, pool_q_only, position_pooling)."""
    if isinstance(model, FunnelEncoder):
        raise TypeError(
            "model is already a funnel encoder; insert() takes a dense Encoder / EmbeddingEncoder / EncoderClassifier"
        )
    if not isinstance(model, Encoder):
        raise TypeError(
            f"insert() takes an effitrans Encoder, EmbeddingEncoder or EncoderClassifier, got {type(model).__name__}"
        )
    spec = surgery_spec(len(model.stack.blocks), at_layer=at_layer, stride=stride, **options)
    kw = dict(stack=model.stack, spec=spec, pooling=model.pooling)
    if isinstance(model, EmbeddingEncoder):
        return FunnelEmbeddingEncoder(proj=model.proj, **kw)
    if isinstance(model, EncoderClassifier):
        return FunnelEncoderClassifier(head=model.head, **kw)
    return FunnelEncoder(**kw)


def funnel_config(model_cfg, *, at_layer: int, stride: int, decoder_layers: int = 0, **options):
    """A copy of a dense encoder's model config with the funnel that insert(..., **options) makes (same
    parameters); decoder_layers is the config's funnel.decoder_layers."""
    import ml_collections

    if model_cfg.name not in FUNNEL_NAMES:
        raise ValueError(f"config.model.name={model_cfg.name!r} has no funnel version; allowed: {sorted(FUNNEL_NAMES)}")
    spec = surgery_spec(model_cfg.num_layers, at_layer=at_layer, stride=stride, **options)
    cfg = copy.deepcopy(model_cfg)
    cfg.name = FUNNEL_NAMES[model_cfg.name]
    f = ml_collections.ConfigDict()
    f.block_layers = ml_collections.FieldReference(list(spec.block_layers), field_type=object)
    f.strides = ml_collections.FieldReference(list(spec.strides), field_type=object)
    f.pooling, f.separate_cls, f.truncate_seq = spec.pooling, spec.separate_cls, spec.truncate_seq
    f.pool_q_only, f.position_pooling, f.decoder_layers = spec.pool_q_only, spec.position_pooling, decoder_layers
    # Configs from config_flags arrive locked; the funnel block is a new key of the copy only.
    with cfg.unlocked():
        cfg.funnel = f
    return cfg
