"""Byte-level language modelling on real English text.

Corpus: the reStructuredText sources of the CPython 3.11 documentation
(Debian package ``python3.11-doc``, files ``*.rst.txt`` under
``/usr/share/doc/python3.11/html/_sources``; ``scripts/get_data.sh`` installs
it). If that directory is absent, the built-in fallback is the text of
``pydoc_data.topics.topics`` (ships with every CPython; one document per topic).

Determinism: the train/validation split depends only on document names (never
on the seed); a training batch depends only on (seed, step).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os
from collections.abc import Sequence

import numpy as np

from effitrans.data import batching
from effitrans.data.tokenizer import EOS, PAD

DEFAULT_CORPUS_DIR = "/usr/share/doc/python3.11/html/_sources"
DEFAULT_CORPUS_GLOB = "/usr/share/doc/python3*/html/_sources"
FALLBACK_CORPUS = "pydoc_data.topics"
TEXT_SUFFIXES = (".rst.txt", ".txt", ".rst", ".md")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """An immutable, ordered collection of text documents.

    Attributes:
      names: document names, sorted (relative POSIX paths, or topic names).
      documents: document texts, aligned with ``names``.
      data: the exact UTF-8 bytes used for each document (what the pipelines read).
      source: "directory", "file" or "pydoc_data.topics".
      path: the directory/file read, or "pydoc_data.topics".
      sha256: hex sha256 over, for each document in order,
        ``name_utf8 + b"\\0" + str(len(data)).encode() + b"\\0" + data``.
    """

    names: tuple
    documents: tuple
    data: tuple
    source: str
    path: str
    sha256: str

    @property
    def num_bytes(self) -> int:
        return sum(len(d) for d in self.data)

    def describe(self) -> dict:
        """JSON-serialisable summary for dataset metadata."""
        return {
            "corpus_source": self.source,
            "corpus_path": self.path,
            "corpus_sha256": self.sha256,
            "corpus_documents": len(self.names),
            "corpus_bytes": self.num_bytes,
        }


def _make_corpus(named_docs: Sequence[tuple], source: str, path: str) -> Corpus:
    named_docs = sorted(named_docs)
    names, documents, data = [], [], []
    digest = hashlib.sha256()
    for name, text in named_docs:
        raw = text.encode("utf-8")
        if not text.strip():
            continue  # empty / whitespace-only documents carry no text
        names.append(name)
        documents.append(text)
        data.append(raw)
        digest.update(name.encode("utf-8") + b"\0" + str(len(raw)).encode() + b"\0")
        digest.update(raw)
    if not names:
        raise ValueError(
            f"corpus_path={path!r} contains no text documents (looked for non-empty files ending in {TEXT_SUFFIXES})"
        )
    return Corpus(tuple(names), tuple(documents), tuple(data), source, path, digest.hexdigest())


def _read_text(path: str, corpus_path: str) -> str:
    """The text of the file at `path` (of the corpus at `corpus_path`); a file that is not UTF-8, or holds NUL
    bytes, is binary and refused."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"corpus_path={corpus_path!r}: file {path!r} is not UTF-8 text (byte {e.start} is "
            f"{raw[e.start : e.start + 1]!r}); a corpus holds UTF-8 text files only"
        ) from None
    if "\0" in text:
        raise ValueError(
            f"corpus_path={corpus_path!r}: file {path!r} holds NUL bytes, so it is binary; a corpus holds text only"
        )
    return text


def _load_directory(path: str) -> Corpus:
    docs = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for fname in files:
            if fname.endswith(TEXT_SUFFIXES):
                full = os.path.join(root, fname)
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                docs.append((rel, _read_text(full, path)))
    return _make_corpus(docs, "directory", path)


def _load_pydoc_topics() -> Corpus:
    from pydoc_data import topics  # stdlib; always available with CPython

    return _make_corpus(list(topics.topics.items()), "pydoc_data.topics", FALLBACK_CORPUS)


def default_corpus_path() -> str:
    """The corpus used when ``corpus_path`` is None.

    The first existing directory among DEFAULT_CORPUS_DIR and (sorted)
    DEFAULT_CORPUS_GLOB, else FALLBACK_CORPUS ("pydoc_data.topics").
    """
    candidates = [DEFAULT_CORPUS_DIR] + sorted(glob.glob(DEFAULT_CORPUS_GLOB))
    for cand in candidates:
        if os.path.isdir(cand):
            return cand
    return FALLBACK_CORPUS


def load_corpus(path: str | None = None) -> Corpus:
    """Loads a text corpus.

    Args:
      path: None (default search, see ``default_corpus_path``), the string
        "pydoc_data.topics" (built-in fallback), a directory (every file ending in
        .rst.txt/.txt/.rst/.md below it, named by relative path), or one file
        (a single document).

    Raises:
      ValueError: naming the path if it does not exist or holds no text, and the file if one is binary
        (not UTF-8, or holding NUL bytes).
    """
    if path is None:
        path = default_corpus_path()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"corpus_path must be a str or None, got {path!r}")
    path = os.fspath(path)
    if path == FALLBACK_CORPUS:
        return _load_pydoc_topics()
    if os.path.isdir(path):
        return _load_directory(path)
    if os.path.isfile(path):
        return _make_corpus([(os.path.basename(path), _read_text(path, path))], "file", path)
    raise ValueError(
        f"corpus_path={path!r} does not exist (expected a directory, a file, "
        f"None for the default search, or {FALLBACK_CORPUS!r})"
    )


def split_documents(corpus: Corpus, val_fraction: float) -> tuple:
    """Deterministic train/validation split by document.

    Documents are ranked by sha256 of their name; the first
    ``max(1, round(n * val_fraction))`` form the validation set. The split depends
    only on the names (not on any seed), so it is identical across runs and seeds.

    Returns:
      (train_indices, val_indices): int64 arrays of document indices, each sorted.
    """
    check_fraction("val_fraction", val_fraction)
    n = len(corpus.names)
    if n < 2:
        raise ValueError(
            f"corpus {corpus.path!r} has {n} document(s); a train/validation split by document needs at least 2"
        )
    k = max(1, int(round(n * val_fraction)))
    k = min(k, n - 1)
    order = sorted(range(n), key=lambda i: hashlib.sha256(corpus.names[i].encode("utf-8")).hexdigest())
    val = np.sort(np.array(order[:k], np.int64))
    train = np.sort(np.array(order[k:], np.int64))
    return train, val


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a float in the open interval (0, 1), got {value!r}")
    return float(value)


def join_documents(docs: Sequence[bytes]) -> np.ndarray:
    """Concatenates byte documents, each followed by EOS. Returns uint16 [sum(len)+n]."""
    out = np.empty(sum(len(d) for d in docs) + len(docs), np.uint16)
    pos = 0
    for d in docs:
        out[pos : pos + len(d)] = np.frombuffer(d, np.uint8)
        pos += len(d)
        out[pos] = EOS
        pos += 1
    return out


def windows_batches(stream: np.ndarray, n: int, length: int, batch: int, spread: bool = True) -> list[dict]:
    """n windows of `length` predicted tokens from a 1-D stream (evenly spread), in batches."""
    need = length + 1
    if stream.size < need:
        raise ValueError(f"stream of {stream.size} tokens is shorter than one window of {need}")
    starts = np.linspace(0, stream.size - need, n).astype(int) if spread else np.arange(n) * length
    rows = np.stack([stream[s : s + need] for s in starts]).astype(np.int32)  # [n, length + 1]
    return [
        {
            "inputs": rows[i : i + batch, :-1],
            "targets": rows[i : i + batch, 1:],
            "weights": np.ones((min(batch, n - i), length), np.float32),
        }
        for i in range(0, n, batch)
    ]


def unigram_entropy_bits(corpus, *, val_fraction: float = 0.05) -> float:
    """Entropy (bits per byte) of the byte unigram distribution.

    Args:
      corpus: a Corpus (uses the bytes of its validation documents under
        ``split_documents(corpus, val_fraction)``, without separators), or raw
        ``bytes`` / ``str`` / integer array of byte values.

    Returns:
      H = -sum_b p(b) log2 p(b); a model's validation bits-per-byte should beat it.
    """
    if isinstance(corpus, Corpus):
        _, val = split_documents(corpus, val_fraction)
        counts = np.zeros(256, np.int64)
        for i in val:
            counts += np.bincount(np.frombuffer(corpus.data[i], np.uint8), minlength=256)
    else:
        if isinstance(corpus, str):
            corpus = corpus.encode("utf-8")
        arr = np.frombuffer(corpus, np.uint8) if isinstance(corpus, bytes) else np.asarray(corpus).reshape(-1)
        counts = np.bincount(arr.astype(np.int64), minlength=1)
    total = counts.sum()
    if total == 0:
        raise ValueError("unigram_entropy_bits: no bytes to measure")
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


class CorpusDataset(batching.BatchedDataset):
    """A dataset over a Corpus split by document into train and validation (``split_documents``).

    Arguments: corpus; keyword global_batch_size, seed, val_fraction=0.05, eval_batch_size=None
    (None: global_batch_size).
    """

    _META_ATTRS = batching.BatchedDataset._META_ATTRS + ("val_fraction",)

    def __init__(
        self,
        corpus: Corpus,
        *,
        global_batch_size: int,
        seed: int,
        val_fraction: float = 0.05,
        eval_batch_size: int | None = None,
    ):
        super().__init__(global_batch_size=global_batch_size, seed=seed, eval_batch_size=eval_batch_size)
        self.corpus = corpus
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.train_docs, self.val_docs = split_documents(corpus, self.val_fraction)

    def _documents(self, indices: np.ndarray) -> list:
        """The UTF-8 bytes of the corpus documents at ``indices``."""
        return [self.corpus.data[i] for i in indices]

    def _metadata(self, attrs: tuple[str, ...] = (), **extra) -> dict:
        docs = {"train_documents": len(self.train_docs), "val_documents": len(self.val_docs)}
        return super()._metadata(attrs, **docs, **self.corpus.describe(), **extra)


class TextLMDataset(CorpusDataset):
    """Byte-level causal LM over a text corpus.

    Training rows: ``seq_len + 1`` consecutive ids starting at a uniform random
    offset of the train stream (train documents, each followed by EOS);
    inputs = row[:-1], targets = row[1:], weights = 1.

    Eval: the validation stream (validation documents, each followed by EOS) cut
    into consecutive non-overlapping windows; window i has inputs
    stream[i*T : i*T+T] and targets stream[i*T+1 : i*T+T+1], so every id after
    the first is predicted exactly once. The tail window is padded with PAD and
    weight 0; padding rows fill the last batch. ``max_eval_batches`` (None = all)
    keeps only the first max_eval_batches * eval_batch_size windows; the number
    used is in ``metadata["eval_windows"]`` (of ``metadata["eval_windows_total"]``).

    Batches: {"inputs": int32 [b, T], "targets": int32 [b, T],
              "weights": float32 [b, T]} with b = B / process_count.
    Other arguments (global_batch_size, seed, val_fraction=0.05, eval_batch_size=None): see
    CorpusDataset.
    """

    name = "text_lm"
    task = "lm"

    def __init__(self, corpus: Corpus, *, seq_len: int, max_eval_batches: int | None = None, **common):
        super().__init__(corpus, **common)
        self.seq_len = batching.check_int("seq_len", seq_len, minimum=1)
        self.max_eval_batches = batching.check_int("max_eval_batches", max_eval_batches, minimum=1, default=None)
        self.train_stream = join_documents(self._documents(self.train_docs))
        self.val_stream = join_documents(self._documents(self.val_docs))
        if len(self.train_stream) < self.seq_len + 1:
            raise ValueError(
                f"seq_len={self.seq_len} needs a train stream of at least seq_len+1 ids; "
                f"corpus {corpus.path!r} gives {len(self.train_stream)}"
            )
        self.eval_windows_total = max(1, math.ceil((len(self.val_stream) - 1) / self.seq_len))
        self.eval_windows = self.eval_windows_total
        if max_eval_batches is not None:
            self.eval_windows = min(self.eval_windows, max_eval_batches * self.eval_batch_size)
        self._val_entropy = unigram_entropy_bits(corpus, val_fraction=self.val_fraction)

    def get_batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict:
        """Training batch for ``step``: a pure function of (seed, step). Shapes [B/P, seq_len]."""
        step = batching.check_int("step", step, minimum=0)
        rows = batching.local_rows(self.global_batch_size, process_index, process_count)
        rng = batching.make_rng(batching.TAG_TEXT_LM, self.seed, step)
        max_start = len(self.train_stream) - (self.seq_len + 1)
        offsets = rng.integers(0, max_start, size=self.global_batch_size, endpoint=True)  # [B]
        idx = offsets[rows, None] + np.arange(self.seq_len + 1)  # [b, T+1]
        window = self.train_stream[idx].astype(np.int32)  # [b, T+1]
        return {
            "inputs": window[:, :-1],
            "targets": window[:, 1:],
            "weights": np.ones((idx.shape[0], self.seq_len), np.float32),
        }

    def _eval_rows(self, indices: np.ndarray) -> dict:
        T = self.seq_len
        n = len(self.val_stream)
        idx = indices[:, None] * T + np.arange(T + 1)  # [k, T+1]
        valid = idx < n
        window = np.where(valid, self.val_stream[np.minimum(idx, n - 1)], PAD).astype(np.int32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:], "weights": valid[:, 1:].astype(np.float32)}

    def _eval_padding(self, k: int) -> dict:
        full = np.full((k, self.seq_len), PAD, np.int32)
        return {"inputs": full, "targets": full.copy(), "weights": np.zeros((k, self.seq_len), np.float32)}

    @property
    def num_eval_rows(self) -> int:
        """Validation windows used for evaluation (eval_windows)."""
        return self.eval_windows

    def unigram_entropy_bits(self) -> float:
        """Byte-unigram entropy (bits/byte) of the validation documents."""
        return self._val_entropy

    @property
    def metadata(self) -> dict:
        return self._metadata(
            ("seq_len", "max_eval_batches", "eval_windows", "eval_windows_total"),
            train_stream_ids=len(self.train_stream),
            val_stream_ids=len(self.val_stream),
            eval_batches=-(-self.eval_windows // self.eval_batch_size),
            val_unigram_entropy_bits=self.unigram_entropy_bits(),
        )
