"""Builds a dataset from a data config.

``build_dataset(data_config, *, global_batch_size, seed)`` reads ``data_config.name`` and the keys that
DATA_KEYS[name] declares; a key not set in the config takes its declared default, which is the dataset
constructor's own default (or, for a length the constructor requires, the one given here). Any other key
is an error, so a typo never goes unnoticed. The values themselves are checked by the constructors; a value
they refuse raises ConfigError naming the config.data key.

corpus_path None means the default search (the CPython docs if installed, else the built-in
pydoc_data.topics); eval_batch_size None means global_batch_size.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from effitrans.data import listops, retrieval, synthetic, text, timeseries
from effitrans.schema import ConfigError, Key, default_config

_TYPES = {"corpus_path": str}  # ConfigDict field types of keys whose default is None (else int)


# What each key means (the same name means the same thing in every dataset that takes it).
_DOCS = {
    "seq_len": "tokens per row, CLS included where there is one (text_lm: bytes per training window)",
    "query_len": "bytes of the query, CLS included",
    "doc_len": "bytes of the document, CLS included",
    "corpus_path": "None: the CPython docs if installed, else pydoc topics",
    "val_fraction": "share held out for validation (text: split by document; timeseries: chronological)",
    "max_eval_batches": "cap the held-out pass at this many batches (None: all)",
    "max_eval_examples": "held-out pairs scored against each other (None: all)",
    "pairing": "halves (first half -> second half) | crops (independent crops of one passage)",
    "min_len": "shortest generated expression, in tokens",
    "max_len": "longest generated expression, in tokens",
    "max_depth": "nesting depth (LRA: 10)",
    "max_args": "arguments per operator (LRA: 10)",
    "min_copy_len": "shortest copied span",
    "max_copy_len": "longest copied span",
    "num_symbols": "copied ids are drawn from [0, num_symbols)",
    "num_pairs": "key-value pairs per row",
    "num_keys": "keys are drawn from [0, num_keys)",
    "num_values": "values are drawn from num_values ids",
    "num_eval_examples": "held-out examples, generated from eval_seed",
    "eval_seed": "the held-out set's seed, apart from training",
    "eval_batch_size": "None: the global batch size",
    "series": "synthetic | a statsmodels series (co2, sunspots, elnino, nile: needs the timeseries extra)",
    "length": "synthetic series: points",
    "num_series": "synthetic series: channels C",
    "noise": "synthetic series: Gaussian noise std",
    "input_len": "past values the model reads (L)",
    "pred_len": "future values it forecasts (H, the horizon)",
    "test_fraction": "last share of the series held out as the test split (chronological)",
    "eval_split": "val | test: the windows the held-out evaluation scores",
}


def _keyword_default(cls: type, name: str) -> Any:
    """The default of keyword `name` in the first `__init__` along `cls`'s MRO that declares it (datasets pass
    the shared keywords to their base class through **common)."""
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters if "__init__" in vars(klass) else {}
        if name in params:
            return params[name].default
    raise TypeError(f"{cls.__name__} has no keyword {name!r} along {[k.__name__ for k in cls.__mro__]}")


def _keys(constructor, names: str, **required) -> dict[str, Key]:
    """The config keys `names` (space-separated) of one dataset, each with the constructor's keyword default,
    or the value in `required` for a key the constructor has no default for."""
    out = {}
    for name in names.split():
        default = required[name] if name in required else _keyword_default(constructor, name)
        out[name] = Key(default, doc=_DOCS[name], field_type=_TYPES.get(name, int) if default is None else None)
    return out


_BUILDER = inspect.signature(timeseries.build_forecast_dataset).parameters  # series keys not in ForecastDataset
_EVAL = "num_eval_examples eval_seed eval_batch_size"
DATA_KEYS = {
    "text_lm": _keys(
        text.TextLMDataset,
        "seq_len corpus_path val_fraction max_eval_batches eval_batch_size",
        seq_len=512,
        corpus_path=None,
    ),
    "text_retrieval": _keys(
        retrieval.TextRetrievalDataset,
        "query_len doc_len corpus_path val_fraction max_eval_examples eval_batch_size pairing",
        query_len=64,
        doc_len=64,
        corpus_path=None,
    ),
    "listops": _keys(listops.ListOpsDataset, f"seq_len min_len max_len max_depth max_args {_EVAL}", seq_len=2048),
    "copy": _keys(synthetic.CopyDataset, f"seq_len min_copy_len max_copy_len num_symbols {_EVAL}", seq_len=64),
    "associative_recall": _keys(
        synthetic.AssociativeRecallDataset, f"seq_len num_pairs num_keys num_values {_EVAL}", seq_len=64
    ),
    "timeseries": _keys(
        timeseries.ForecastDataset,
        "series length num_series noise input_len pred_len val_fraction test_fraction eval_split eval_batch_size",
        **{k: v.default for k, v in _BUILDER.items() if v.default is not inspect.Parameter.empty},
    ),
}
DATASET_NAMES = tuple(DATA_KEYS)


def data_defaults(name: str, **overrides) -> ml_collections.ConfigDict:
    """The `config.data` group of dataset `name`: every declared key at its default, then `overrides`."""
    if name not in DATA_KEYS:
        raise ValueError(f"data.name={name!r} is not a known dataset; allowed {list(DATASET_NAMES)}")
    cfg = default_config({"name": Key(name)})
    cfg.update(default_config(DATA_KEYS[name], **overrides))
    return cfg


def _as_dict(cfg: Any) -> dict:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return dict(cfg.to_dict())
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    if hasattr(cfg, "__dict__"):
        return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    raise TypeError(f"data_config must be a ConfigDict, mapping or attribute object, got {type(cfg).__name__}")


def resolve_config(data_config: Any) -> dict:
    """The config's keys merged over the DATA_KEYS[name] defaults (including "name").

    Raises:
      ConfigError (a ValueError): unknown name, or a field not allowed for that name.
    """
    cfg = _as_dict(data_config)
    name = cfg.pop("name", None)
    if name not in DATA_KEYS:
        raise ConfigError(f"data.name={name!r} is not a known dataset; allowed {list(DATASET_NAMES)}")
    unknown = sorted(set(cfg) - set(DATA_KEYS[name]))
    if unknown:
        raise ConfigError(
            f"data.{unknown[0]}={cfg[unknown[0]]!r} is not a field of dataset "
            f"{name!r}; allowed fields {sorted(DATA_KEYS[name])} (unknown: {unknown})"
        )
    out = {key: declared.default for key, declared in DATA_KEYS[name].items()}
    out.update(cfg)
    out["name"] = name
    return out


def build_dataset(data_config: Any, *, global_batch_size: int, seed: int):
    """Dataset object for ``data_config.name`` (see the module docstring for fields).

    Args:
      data_config: ConfigDict (or mapping / attribute object) with ``name``.
      global_batch_size: B, the batch size summed over all processes.
      seed: the training seed; batches are a pure function of (seed, step).

    Returns:
      An object with get_batch(step, *, process_index, process_count),
      eval_batches(process_index, process_count), metadata and task.
    """
    cfg = resolve_config(data_config)
    name = cfg.pop("name")
    common = {"global_batch_size": global_batch_size, "seed": seed}
    try:
        if name in ("text_lm", "text_retrieval"):
            corpus = text.load_corpus(cfg["corpus_path"])
            kind = text.TextLMDataset if name == "text_lm" else retrieval.TextRetrievalDataset
            return kind(corpus, **{k: v for k, v in cfg.items() if k != "corpus_path"}, **common)
        if name == "listops":
            return listops.ListOpsDataset(**cfg, **common)
        if name == "timeseries":
            return timeseries.build_forecast_dataset(**cfg, **common)
        if name == "copy":
            return synthetic.CopyDataset(**cfg, **common)
        return synthetic.AssociativeRecallDataset(**cfg, **common)
    except (ValueError, TypeError, ImportError) as e:
        raise _data_error(name, cfg, e) from e


def _data_error(name: str, cfg: dict, error: Exception) -> ConfigError:
    """The ConfigError for a value the dataset constructor refused, naming the first config.data key that
    the constructor's message mentions (global_batch_size and seed come from config.train)."""
    message = str(error)
    mentioned = [(m.start(), key) for key in cfg for m in [re.search(rf"\b{key}\b", message)] if m]
    if not mentioned:
        return ConfigError(f"data config {name!r}: {message}")
    key = min(mentioned)[1]
    if message.startswith(f"{key}={cfg[key]!r}"):  # the message names key and value itself
        return ConfigError(f"config.data.{message} (dataset {name!r})")
    return ConfigError(f"config.data.{key}={cfg[key]!r} is not allowed for dataset {name!r}: {message}")
