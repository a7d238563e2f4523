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


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    """Validates an integer argument (bools rejected); returns it as int."""
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
