"""Synthetic LM tasks for tests and mechanism probes: copy and associative recall.

Both emit LM batches {"inputs": int32 [b, T], "targets": int32 [b, T],
"weights": float32 [b, T]} with targets = inputs shifted by one and weight 1
only on the positions the task scores. A global batch is generated from one
generator keyed on (seed, step) and then sliced per process; the held-out set
is generated once from (eval_seed) with a different stream tag.
"""

from __future__ import annotations

import functools

import numpy as np

from effitrans.data import batching
from effitrans.data.tokenizer import BOS, MASK, NUM_BYTES, PAD

SEPARATOR = MASK  # the copy task's separator id
VALUE_OFFSET = 128  # associative-recall values use ids VALUE_OFFSET + v


def _lm_from_full(full: np.ndarray, score: np.ndarray) -> dict:
    """full: int32 [k, T+1] sequences (PAD-filled); score: bool [k, T+1], True
    where the *token* is scored. Returns the shifted LM batch of width T."""
    return {"inputs": full[:, :-1].copy(), "targets": full[:, 1:].copy(), "weights": score[:, 1:].astype(np.float32)}


class _SyntheticLM(batching.GeneratedDataset):
    """A synthetic LM task: ``_generate(rng, k)`` makes k rows; training from (seed, step), the held-out
    set once from eval_seed. Arguments: see batching.GeneratedDataset."""

    task = "lm"
    _train_tag = 0
    _eval_tag = 0

    def _generate(self, rng: np.random.Generator, k: int) -> dict:
        raise NotImplementedError

    def get_batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict:
        """Training batch for ``step``: a pure function of (seed, step). Shapes [B/P, seq_len]."""
        step = batching.check_int("step", step, minimum=0)
        rows = batching.local_rows(self.global_batch_size, process_index, process_count)
        batch = self._generate(batching.make_rng(self._train_tag, self.seed, step), self.global_batch_size)
        return {k: v[rows] for k, v in batch.items()}

    @functools.cached_property
    def eval_set(self) -> dict:
        """The whole held-out set, arrays with leading dim num_eval_examples."""
        return self._generate(batching.make_rng(self._eval_tag, self.eval_seed), self.num_eval_examples)

    def _eval_rows(self, indices: np.ndarray) -> dict:
        return {k: v[indices] for k, v in self.eval_set.items()}

    def _eval_padding(self, k: int) -> dict:
        full = np.full((k, self.seq_len), PAD, np.int32)
        return {"inputs": full, "targets": full.copy(), "weights": np.zeros((k, self.seq_len), np.float32)}


class CopyDataset(_SyntheticLM):
    """Copy task: [BOS, x_1..x_L, SEP, x_1..x_L, PAD...] with SEP = MASK (260).

    x_i are uniform over ids [0, num_symbols); L is uniform in
    [min_copy_len, max_copy_len] per row. Weights are 1 exactly on the targets
    x_1..x_L of the second copy (L per row). Needs seq_len >= 2*max_copy_len + 1.
    Other arguments (seq_len, global_batch_size, seed, num_eval_examples=256, eval_seed=0,
    eval_batch_size=None): see batching.GeneratedDataset.
    """

    _train_tag = batching.TAG_COPY_TRAIN
    _eval_tag = batching.TAG_COPY_EVAL
    name = "copy"

    def __init__(self, *, min_copy_len: int = 1, max_copy_len: int = 16, num_symbols: int = 16, **common):
        super().__init__(**common)
        self.min_copy_len = batching.check_int("min_copy_len", min_copy_len, minimum=1)
        self.max_copy_len = batching.check_int("max_copy_len", max_copy_len, minimum=1)
        self.num_symbols = batching.check_int("num_symbols", num_symbols, minimum=2)
        if self.num_symbols > NUM_BYTES:
            raise ValueError(f"num_symbols={num_symbols} must be <= {NUM_BYTES}")
        if self.min_copy_len > self.max_copy_len:
            raise ValueError(f"min_copy_len={min_copy_len} must be <= max_copy_len={max_copy_len}")
        if 2 * self.max_copy_len + 1 > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2*max_copy_len+1 = {2 * max_copy_len + 1}")

    def _generate(self, rng, k):
        lengths = rng.integers(self.min_copy_len, self.max_copy_len, size=k, endpoint=True)  # [k]
        symbols = rng.integers(0, self.num_symbols, size=(k, self.max_copy_len))  # [k, Lmax]
        full = np.full((k, self.seq_len + 1), PAD, np.int32)  # [k, T+1]
        score = np.zeros(full.shape, bool)
        full[:, 0] = BOS
        for r in range(k):
            L = int(lengths[r])
            x = symbols[r, :L]
            full[r, 1 : L + 1] = x
            full[r, L + 1] = SEPARATOR
            full[r, L + 2 : 2 * L + 2] = x
            score[r, L + 2 : 2 * L + 2] = True
        return _lm_from_full(full, score)

    @property
    def metadata(self) -> dict:
        return self._metadata(("min_copy_len", "max_copy_len", "num_symbols"), separator_id=SEPARATOR)


class AssociativeRecallDataset(_SyntheticLM):
    """Associative recall: [BOS, k_1, v_1, ..., k_n, v_n, q, v_q, PAD...].

    Keys are ``num_pairs`` distinct ids from [0, num_keys); values are ids
    VALUE_OFFSET + [0, num_values) drawn with replacement; the query q is one of
    the keys, uniformly. The only weighted target is v_q (predicted at the
    position of q). Needs seq_len >= 2*num_pairs + 2. Other arguments: as CopyDataset.
    """

    _train_tag = batching.TAG_RECALL_TRAIN
    _eval_tag = batching.TAG_RECALL_EVAL
    name = "associative_recall"

    def __init__(self, *, num_pairs: int = 8, num_keys: int = 32, num_values: int = 32, **common):
        super().__init__(**common)
        self.num_pairs = batching.check_int("num_pairs", num_pairs, minimum=1)
        self.num_keys = batching.check_int("num_keys", num_keys, minimum=1)
        self.num_values = batching.check_int("num_values", num_values, minimum=2)
        if not self.num_pairs <= self.num_keys <= VALUE_OFFSET:
            raise ValueError(f"num_keys={num_keys} must be in [num_pairs={num_pairs}, {VALUE_OFFSET}]")
        if self.num_values > NUM_BYTES - VALUE_OFFSET:
            raise ValueError(f"num_values={num_values} must be <= {NUM_BYTES - VALUE_OFFSET}")
        if 2 * self.num_pairs + 2 > self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2*num_pairs+2 = {2 * num_pairs + 2}")

    def _generate(self, rng, k):
        n = self.num_pairs
        keys = np.argsort(rng.random((k, self.num_keys)), axis=1)[:, :n]  # [k, n] distinct
        values = VALUE_OFFSET + rng.integers(0, self.num_values, size=(k, n))  # [k, n]
        which = rng.integers(0, n, size=k)  # [k]
        full = np.full((k, self.seq_len + 1), PAD, np.int32)  # [k, T+1]
        full[:, 0] = BOS
        full[:, 1 : 2 * n + 1 : 2] = keys
        full[:, 2 : 2 * n + 2 : 2] = values
        rows = np.arange(k)
        full[:, 2 * n + 1] = keys[rows, which]
        full[:, 2 * n + 2] = values[rows, which]
        score = np.zeros(full.shape, bool)
        score[:, 2 * n + 2] = True
        return _lm_from_full(full, score)

    @property
    def metadata(self) -> dict:
        return self._metadata(("num_pairs", "num_keys", "num_values"), value_offset=VALUE_OFFSET)
