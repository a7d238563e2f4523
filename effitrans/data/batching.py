"""Shared helpers for step-indexed, process-sliced batching (numpy only).

Determinism contract used by every dataset:
  * A training batch is a pure function of (seed, step). Randomness comes from
    ``make_rng(tag, seed, step, ...)``, a fresh ``np.random.Generator`` per call,
    so the batch never depends on which batches were requested before.
  * Process ``p`` of ``P`` receives rows ``[p*B/P, (p+1)*B/P)`` of the global
    batch of size ``B``; concatenating the per-process slices in process order
    gives exactly the global batch.
  * Evaluation iterates a fixed held-out set in a fixed order; the last global
    batch is filled with padding rows whose weights are all 0, never dropped.
    Every process yields the same number of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from effitrans.data.tokenizer import VOCAB_SIZE

Batch = dict[str, np.ndarray]

# Domain-separation tags: the first word of every seed sequence, so that the
# random streams of different datasets / train vs eval never coincide.
TAG_TEXT_LM = 0x7E47
TAG_RETRIEVAL = 0x2E72
TAG_RETRIEVAL_EVAL = 0x2E73
TAG_LISTOPS_TRAIN = 0x0915
TAG_LISTOPS_EVAL = 0x0916
TAG_COPY_TRAIN = 0xC097
TAG_COPY_EVAL = 0xC098
TAG_RECALL_TRAIN = 0xA55C
TAG_RECALL_EVAL = 0xA55D


_REQUIRED = object()


def check_int(name: str, value, *, minimum: int | None = None, default=_REQUIRED) -> int:
    """Validates an integer argument (bools rejected); returns it as int.

    With ``default`` given, ``value`` may be None, which returns ``default`` (e.g. eval_batch_size None
    means the global batch size; max_eval_batches None stays None).
    """
    if value is None and default is not _REQUIRED:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def make_rng(tag: int, *ints: int) -> np.random.Generator:
    """A fresh generator keyed by (tag, *ints); all ints must be >= 0."""
    for i, v in enumerate(ints):
        if int(v) < 0:
            raise ValueError(f"seed/step components must be >= 0, got {ints} (index {i})")
    return np.random.default_rng([int(tag)] + [int(v) for v in ints])


def local_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """The slice of global-batch rows owned by ``process_index``.

    Raises:
      ValueError: if global_batch_size is not divisible by process_count, or
        process_index is not in [0, process_count).
    """
    global_batch_size = check_int("global_batch_size", global_batch_size, minimum=1)
    process_count = check_int("process_count", process_count, minimum=1)
    process_index = check_int("process_index", process_index, minimum=0)
    if process_index >= process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by process_count={process_count}")
    per = global_batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def eval_iterator(
    num_examples: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    make_rows: Callable[[np.ndarray], Batch],
    make_padding: Callable[[int], Batch],
) -> Iterator[Batch]:
    """Iterates a held-out set of ``num_examples`` rows in global batches.

    Args:
      num_examples: size of the held-out set (rows 0..num_examples-1).
      batch_size: global eval batch size B (divisible by process_count).
      process_index, process_count: this process and the number of processes.
      make_rows: maps int64 [k] example indices to a batch dict with leading dim k.
      make_padding: maps k to a batch dict of k padding rows (all weights 0).

    Yields:
      ceil(num_examples / B) batch dicts with leading dim B / process_count.
    """
    rows = local_rows(batch_size, process_index, process_count)
    num_batches = -(-num_examples // batch_size)
    for b in range(num_batches):
        idx = np.arange(b * batch_size + rows.start, b * batch_size + rows.stop, dtype=np.int64)
        real = idx[idx < num_examples]
        parts = []
        if real.size:
            parts.append(make_rows(real))
        if real.size < idx.size:
            parts.append(make_padding(idx.size - real.size))
        if len(parts) == 1:
            yield parts[0]
        else:
            yield {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


class BatchedDataset:
    """What every dataset shares: global and eval batch sizes, the seed, the ordered eval loop and the
    metadata keys that describe them.

    eval_batch_size None means global_batch_size. Subclasses set ``name`` and ``task`` and define
    ``get_batch``, ``num_eval_rows`` (size of the held-out set), ``_eval_rows(indices int64 [k])``
    and ``_eval_padding(k)`` (k rows of weight 0).
    """

    name = ""
    task = ""

    def __init__(self, *, global_batch_size: int, seed: int, eval_batch_size: int | None = None):
        self.global_batch_size = check_int("global_batch_size", global_batch_size, minimum=1)
        self.seed = check_int("seed", seed, minimum=0)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size, minimum=1, default=self.global_batch_size)

    @property
    def num_eval_rows(self) -> int:
        raise NotImplementedError

    def _eval_rows(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def _eval_padding(self, k: int) -> Batch:
        raise NotImplementedError

    def eval_batches(self, process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
        """The fixed held-out set in order, eval_batch_size rows per global batch; the last batch is
        padded with rows of weight 0."""
        return eval_iterator(
            self.num_eval_rows, self.eval_batch_size, process_index, process_count, self._eval_rows, self._eval_padding
        )

    _META_ATTRS: tuple[str, ...] = ("global_batch_size", "eval_batch_size", "seed")

    def _metadata(self, attrs: tuple[str, ...] = (), **extra) -> dict:
        """JSON-serialisable metadata: name, task, vocab_size, the attributes named in _META_ATTRS and
        ``attrs``, then ``extra``."""
        meta = {"name": self.name, "task": self.task, "vocab_size": VOCAB_SIZE}
        meta.update({key: getattr(self, key) for key in self._META_ATTRS + tuple(attrs)})
        meta.update(extra)
        return meta


class GeneratedDataset(BatchedDataset):
    """A dataset generated from seeds (no corpus): sequences of ``seq_len`` and a fixed held-out set of
    ``num_eval_examples`` rows generated from ``eval_seed``."""

    _META_ATTRS = BatchedDataset._META_ATTRS + ("seq_len", "eval_seed", "num_eval_examples")

    def __init__(
        self,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        num_eval_examples: int = 256,
        eval_seed: int = 0,
        eval_batch_size: int | None = None,
    ):
        super().__init__(global_batch_size=global_batch_size, seed=seed, eval_batch_size=eval_batch_size)
        self.seq_len = check_int("seq_len", seq_len, minimum=2)
        self.num_eval_examples = check_int("num_eval_examples", num_eval_examples, minimum=1)
        self.eval_seed = check_int("eval_seed", eval_seed, minimum=0)

    @property
    def num_eval_rows(self) -> int:
        return self.num_eval_examples

    def _metadata(self, attrs: tuple[str, ...] = (), **extra) -> dict:
        return super()._metadata(attrs, corpus_path=None, **extra)
