"""One registry from `config.model.name` to a model class; every model is built from its sub-config."""

from __future__ import annotations

from flax import nnx

from effitrans.models.transformer import CausalLM, EmbeddingEncoder, EncoderClassifier


def _funnel(class_name: str):
    """Builder of an effitrans.funnel model, imported on use (effitrans.funnel imports this package)."""

    def build(model_cfg, *, rngs: nnx.Rngs) -> nnx.Module:
        from effitrans.funnel import encoder

        return getattr(encoder, class_name)(model_cfg, rngs=rngs)

    build.__name__ = class_name
    return build


MODELS = {
    "causal_lm": CausalLM,
    "encoder_classifier": EncoderClassifier,
    "encoder_embedding": EmbeddingEncoder,
    "funnel_classifier": _funnel("FunnelEncoderClassifier"),  # + model.funnel group: docs/funnel.md
    "funnel_embedding": _funnel("FunnelEmbeddingEncoder"),
}


def build_model(model_cfg, *, seed: int = 0) -> nnx.Module:
    """The model named by model_cfg.name, with parameters drawn from `seed`."""
    from effitrans.config_validation import validate_model_config

    validate_model_config(model_cfg)
    return MODELS[model_cfg.name](model_cfg, rngs=nnx.Rngs(params=seed))
