"""The model registry: `config.model.name` -> model class, the whole `config.model` schema assembled from
the parts that own its keys (models, attention families, funnel), and `build_model`."""

from __future__ import annotations

from flax import nnx

from effitrans.attention import attention_keys
from effitrans.cascades.exit_heads import check_exit_config
from effitrans.funnel.config import FUNNEL_KEYS, check_funnel_config
from effitrans.funnel.encoder import FunnelEmbeddingEncoder, FunnelEncoderClassifier
from effitrans.models.autoformer import AUTOFORMER_KEYS, Autoformer, check_autoformer_config
from effitrans.models.forecast_baselines import DLINEAR_KEYS, DLinear, check_dlinear_config
from effitrans.models.forecasters import (
    GROUP_KEYS,
    CKCNNClassifier,
    CKCNNForecaster,
    CNNForecaster,
    TransformerForecaster,
    check_forecasters_config,
)
from effitrans.models.transformer import MODEL_KEYS, CausalLM, EmbeddingEncoder, EncoderClassifier, check_moe_config
from effitrans.schema import NOT_SET, ConfigError, Key, is_int, one_of, validate

MODELS = {
    "causal_lm": CausalLM,
    "encoder_classifier": EncoderClassifier,
    "encoder_embedding": EmbeddingEncoder,
    "funnel_classifier": FunnelEncoderClassifier,  # + model.funnel group: docs/funnel.md
    "funnel_embedding": FunnelEmbeddingEncoder,
    "autoformer": Autoformer,  # + model.autoformer group: docs/timeseries.md
    "dlinear": DLinear,  # + model.dlinear group
    "transformer_forecaster": TransformerForecaster,  # + model.<name> group: effitrans.models.forecasters
    "ckcnn": CKCNNForecaster,
    "cnn": CNNForecaster,
    "ckcnn_classifier": CKCNNClassifier,
}
# Keys without a default that a model name needs.
REQUIRED_KEYS = {
    "encoder_classifier": ("num_classes",),
    "encoder_embedding": ("embed_dim",),
    "funnel_classifier": ("num_classes",),
    "funnel_embedding": ("embed_dim",),
    "autoformer": ("autoformer",),
    "dlinear": ("dlinear",),
    **{name: (name,) for name in GROUP_KEYS},
    "ckcnn_classifier": ("ckcnn_classifier", "num_classes"),
}
FORECASTERS = (
    "autoformer",
    "dlinear",
    "transformer_forecaster",
    "ckcnn",
    "cnn",
)  # forecast-task models; each reads the model.<name> group


def model_keys(kind: str = "dense") -> dict:
    """The `config.model` group (attention keys checked for attention kind `kind`)."""
    return {
        "name": Key("causal_lm", one_of(*MODELS), "the model class (MODELS)"),
        **MODEL_KEYS,
        "attention": attention_keys(kind),
        "funnel": Key(NOT_SET, FUNNEL_KEYS, "funnel_* models only (effitrans.funnel.FUNNEL_KEYS)"),
        "autoformer": Key(NOT_SET, AUTOFORMER_KEYS, "autoformer only (effitrans.models.autoformer.AUTOFORMER_KEYS)"),
        "dlinear": Key(NOT_SET, DLINEAR_KEYS, "dlinear only (effitrans.models.forecast_baselines.DLINEAR_KEYS)"),
        **{
            name: Key(NOT_SET, keys, f"{name} only (effitrans.models.forecasters.GROUP_KEYS)")
            for name, keys in GROUP_KEYS.items()
        },
    }


def validate_model_config(model_cfg, prefix: str = "config.model") -> None:
    """Checks model keys and the relations between them (e.g. num_heads % num_kv_heads)."""
    validate(model_cfg, model_keys(model_cfg.attention.get("kind")), prefix)
    m = model_cfg
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"{prefix}.num_kv_heads={m.num_kv_heads} must divide {prefix}.num_heads={m.num_heads} "
            f"(allowed: {[d for d in range(1, m.num_heads + 1) if m.num_heads % d == 0]})"
        )
    if m.get("rope_base") is not None and m.head_dim % 2:
        raise ConfigError(f"{prefix}.head_dim={m.head_dim} must be even when RoPE is used (rope_base set)")
    if not is_int(m.ffn_width) and len(m.ffn_width) != m.num_layers:
        raise ConfigError(
            f"{prefix}.ffn_width has {len(m.ffn_width)} entries but {prefix}.num_layers="
            f"{m.num_layers}; give one width per layer or a single int"
        )
    for key in REQUIRED_KEYS.get(m.name, ()):
        if key not in m:
            raise ConfigError(f"{prefix}.{key} is required when {prefix}.name={m.name!r}")
    if m.name not in ("causal_lm", *FORECASTERS) and "pooling" not in m:
        raise ConfigError(f"{prefix}.pooling is required for encoder models (one of 'cls', 'mean')")
    check_funnel_config(m, prefix)
    check_autoformer_config(m, prefix)
    check_dlinear_config(m, prefix)
    check_forecasters_config(m, prefix)
    check_moe_config(m, prefix)
    check_exit_config(m, prefix)


def build_model(model_cfg, *, seed: int = 0) -> nnx.Module:
    """The model named by model_cfg.name, with parameters drawn from `seed`."""
    validate_model_config(model_cfg)
    return MODELS[model_cfg.name](model_cfg, rngs=nnx.Rngs(params=seed))
