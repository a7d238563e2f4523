"""Builds a dataset from a data config.

``build_dataset(data_config, *, global_batch_size, seed)`` reads
``data_config.name`` and the fields listed in FIELDS[name]; every field not
set in the config takes the default shown there (configs/*.py should set them
explicitly). Any other field is an error, so a typo never goes unnoticed.

  text_lm:            seq_len=512, corpus_path=None, val_fraction=0.05,
                      max_eval_batches=None, eval_batch_size=None
  text_retrieval:     query_len=64, doc_len=64, corpus_path=None, val_fraction=0.05,
                      max_eval_examples=None, eval_batch_size=None, pairing="halves"
                      (or "crops": independent random crops of one passage)
  listops:            seq_len=2048, min_len=500, max_len=2000, max_depth=10, max_args=10,
                      num_eval_examples=2000, eval_seed=0, eval_batch_size=None
  copy:               seq_len=64, min_copy_len=1, max_copy_len=16, num_symbols=16,
                      num_eval_examples=256, eval_seed=0, eval_batch_size=None
  associative_recall: seq_len=64, num_pairs=8, num_keys=32, num_values=32,
                      num_eval_examples=256, eval_seed=0, eval_batch_size=None

corpus_path None means the default search (the CPython docs if installed, else
the built-in pydoc_data.topics); eval_batch_size None means global_batch_size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from effitrans.data import listops, retrieval, synthetic, text

FIELDS = {
    "text_lm": {
        "seq_len": 512,
        "corpus_path": None,
        "val_fraction": 0.05,
        "max_eval_batches": None,
        "eval_batch_size": None,
    },
    "text_retrieval": {
        "query_len": 64,
        "doc_len": 64,
        "corpus_path": None,
        "val_fraction": 0.05,
        "max_eval_examples": None,
        "eval_batch_size": None,
        "pairing": "halves",
    },
    "listops": {
        "seq_len": 2048,
        "min_len": 500,
        "max_len": 2000,
        "max_depth": 10,
        "max_args": 10,
        "num_eval_examples": 2000,
        "eval_seed": 0,
        "eval_batch_size": None,
    },
    "copy": {
        "seq_len": 64,
        "min_copy_len": 1,
        "max_copy_len": 16,
        "num_symbols": 16,
        "num_eval_examples": 256,
        "eval_seed": 0,
        "eval_batch_size": None,
    },
    "associative_recall": {
        "seq_len": 64,
        "num_pairs": 8,
        "num_keys": 32,
        "num_values": 32,
        "num_eval_examples": 256,
        "eval_seed": 0,
        "eval_batch_size": None,
    },
}
DATASET_NAMES = tuple(FIELDS)


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
    """The config's fields merged over FIELDS[name] defaults (including "name").

    Raises:
      ValueError: unknown name, or a field not allowed for that name.
    """
    cfg = _as_dict(data_config)
    name = cfg.pop("name", None)
    if name not in FIELDS:
        raise ValueError(f"data.name={name!r} is not a known dataset; allowed {list(DATASET_NAMES)}")
    unknown = sorted(set(cfg) - set(FIELDS[name]))
    if unknown:
        raise ValueError(
            f"data.{unknown[0]}={cfg[unknown[0]]!r} is not a field of dataset "
            f"{name!r}; allowed fields {sorted(FIELDS[name])} (unknown: {unknown})"
        )
    out = dict(FIELDS[name])
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
        if name == "text_lm":
            corpus = text.load_corpus(cfg.pop("corpus_path"))
            return text.TextLMDataset(corpus, **cfg, **common)
        if name == "text_retrieval":
            corpus = text.load_corpus(cfg.pop("corpus_path"))
            return retrieval.TextRetrievalDataset(corpus, **cfg, **common)
        if name == "listops":
            return listops.ListOpsDataset(**cfg, **common)
        if name == "copy":
            return synthetic.CopyDataset(**cfg, **common)
        return synthetic.AssociativeRecallDataset(**cfg, **common)
    except (ValueError, TypeError) as e:
        raise type(e)(f"data config {name!r}: {e}") from e
