"""Deterministic, step-indexed input pipelines (numpy only).

Every dataset has ``get_batch(step, *, process_index=0, process_count=1)``,
``eval_batches(process_index=0, process_count=1)``, ``metadata`` and ``task``;
see docs/data.md.
"""

from effitrans.data.listops import ListOpsDataset
from effitrans.data.registry import DATA_KEYS, DATASET_NAMES, build_dataset, data_defaults, resolve_config
from effitrans.data.retrieval import TextRetrievalDataset, paired_recall_loss, retrieval_metrics, retrieval_ranks
from effitrans.data.synthetic import AssociativeRecallDataset, CopyDataset
from effitrans.data.text import (
    Corpus,
    TextLMDataset,
    load_corpus,
    split_documents,
    unigram_entropy_bits,
    windows_batches,
)
from effitrans.data.tokenizer import BOS, CLS, EOS, MASK, PAD, VOCAB_SIZE, decode, encode

__all__ = [
    "AssociativeRecallDataset",
    "BOS",
    "CLS",
    "Corpus",
    "CopyDataset",
    "DATASET_NAMES",
    "DATA_KEYS",
    "EOS",
    "ListOpsDataset",
    "MASK",
    "PAD",
    "TextLMDataset",
    "TextRetrievalDataset",
    "VOCAB_SIZE",
    "build_dataset",
    "decode",
    "encode",
    "load_corpus",
    "data_defaults",
    "resolve_config",
    "paired_recall_loss",
    "retrieval_metrics",
    "retrieval_ranks",
    "split_documents",
    "unigram_entropy_bits",
    "windows_batches",
]
