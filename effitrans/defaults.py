"""The default groups every experiment config starts from, built from the keys each part declares:

    from effitrans import defaults
    config = defaults.experiment(
        defaults.model(d_model=256), defaults.data("text_lm", seq_len=128), defaults.train(steps=100), defaults.mesh()
    )

Each function returns a fresh ml_collections.ConfigDict holding every declared key of its group at its default
(keys whose default is None keep their type, so any of them can be set from the command line), then the
given overrides. What each key means: the Key declarations (effitrans.registry.model_keys, FUNNEL_KEYS,
data.registry.DATA_KEYS, train.schema), and docs/contracts.md.
"""

from __future__ import annotations

import ml_collections

from effitrans.cascades.config import CASCADE_KEYS
from effitrans.cascades.exit_heads import EXIT_KEYS
from effitrans.data.registry import data_defaults
from effitrans.funnel.config import FUNNEL_KEYS
from effitrans.layers.moe import MOE_KEYS
from effitrans.models.autoformer import AUTOFORMER_KEYS
from effitrans.models.forecast_baselines import DLINEAR_KEYS
from effitrans.models.forecasters import GROUP_KEYS
from effitrans.registry import model_keys
from effitrans.schema import default_config
from effitrans.train.schema import MESH_KEYS, TRAIN_KEYS


def model(**overrides) -> ml_collections.ConfigDict:
    """config.model: a causal LM with dense attention; every attention family's own keys declared None."""
    return default_config(model_keys(), **overrides)


def funnel(**overrides) -> ml_collections.ConfigDict:
    """config.model.funnel, for model.name = funnel_embedding | funnel_classifier."""
    return default_config(FUNNEL_KEYS, **overrides)


def autoformer(**overrides) -> ml_collections.ConfigDict:
    """config.model.autoformer, for model.name = autoformer."""
    return default_config(AUTOFORMER_KEYS, **overrides)


def dlinear(**overrides) -> ml_collections.ConfigDict:
    """config.model.dlinear, for model.name = dlinear."""
    return default_config(DLINEAR_KEYS, **overrides)


def model_group(name: str, **overrides) -> ml_collections.ConfigDict:
    """config.model.<name> for model.name = transformer_forecaster | ckcnn | cnn | ckcnn_classifier."""
    if name not in GROUP_KEYS:
        raise ValueError(f"name={name!r} is not one of {sorted(GROUP_KEYS)}")
    return default_config(GROUP_KEYS[name], **overrides)


def moe(**overrides) -> ml_collections.ConfigDict:
    """config.model.moe: a mixture-of-experts feed-forward in the layers it names (docs/moe.md)."""
    return default_config(MOE_KEYS, **overrides)


def exits(**overrides) -> ml_collections.ConfigDict:
    """config.model.exits: early-exit heads after the layers it names (docs/cascades.md)."""
    return default_config(EXIT_KEYS, **overrides)


def cascade(**overrides) -> ml_collections.ConfigDict:
    """config.cascade: the stages, scorer, routers and exit calibration of a cascade study (docs/cascades.md)."""
    return default_config(CASCADE_KEYS, **overrides)


def data(name: str, **overrides) -> ml_collections.ConfigDict:
    """config.data of dataset `name` (effitrans.data.DATASET_NAMES)."""
    return data_defaults(name, **overrides)


def train(**overrides) -> ml_collections.ConfigDict:
    return default_config(TRAIN_KEYS, **overrides)


def mesh(**overrides) -> ml_collections.ConfigDict:
    return default_config(MESH_KEYS, **overrides)


def experiment(model_cfg, data_cfg, train_cfg, mesh_cfg) -> ml_collections.ConfigDict:
    """The four groups as one config."""
    c = ml_collections.ConfigDict()
    c.model, c.data, c.train, c.mesh = model_cfg, data_cfg, train_cfg, mesh_cfg
    return c
