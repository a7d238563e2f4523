"""Text retrieval pairs (query and doc cut from one passage) and pure scoring
functions for dual-encoder retrieval.

Two pairings (``pairing``):
  "halves": query = the passage's first ``query_len - 1`` bytes, doc = the rest
    (continuation matching: the halves share only topic, no text).
  "crops":  query and doc are independent random crops of the same passage
    (Contriever's independent cropping, Izacard et al. 2022): a query crop of
    ``query_len - 1`` bytes at offset a in [0, doc_len - 1] and a doc crop of
    ``doc_len - 1`` bytes at offset b in [0, query_len - 1], so the two share
    0 to min(query_len, doc_len) - 1 bytes of text. Training draws offsets per
    step; eval offsets are fixed per held-out passage (keyed on the seed).
    A small encoder learns this in minutes, which makes quality differences
    between model variants measurable on a CPU.

Passages come from the same corpus and the same document-level train/validation
split as ``text_lm`` (see ``effitrans.data.text``). Each document is cut into
consecutive, non-overlapping passages of ``(query_len - 1) + (doc_len - 1)``
bytes; the remainder of a document shorter than one passage is not used
(``metadata["unused_tail_bytes"]`` counts it). Passages whose query or doc half
is whitespace-only, or whose query or doc half repeats an earlier passage's,
are dropped, so every query has exactly one matching doc.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from effitrans.data import batching
from effitrans.data.text import Corpus, CorpusDataset
from effitrans.data.tokenizer import CLS, PAD


def make_passages(docs: Sequence[bytes], query_bytes: int, doc_bytes: int) -> tuple:
    """Cuts byte documents into unique (query, doc) passage halves.

    Returns:
      (passages uint8 [n, query_bytes + doc_bytes], unused_tail_bytes int,
       dropped_passages int).
    """
    size = query_bytes + doc_bytes
    out, seen_q, seen_d = [], set(), set()
    tail = dropped = 0
    for d in docs:
        full = len(d) // size
        tail += len(d) - full * size
        for j in range(full):
            p = d[j * size : (j + 1) * size]
            q, k = p[:query_bytes], p[query_bytes:]
            if not q.strip() or not k.strip() or q in seen_q or k in seen_d:
                dropped += 1
                continue
            seen_q.add(q)
            seen_d.add(k)
            out.append(np.frombuffer(p, np.uint8))
    arr = np.stack(out) if out else np.zeros((0, size), np.uint8)
    return arr, tail, dropped


PAIRINGS = ("halves", "crops")


class TextRetrievalDataset(CorpusDataset):
    """Query/doc pairs for in-batch contrastive training of an embedding encoder.

    Batches: {"query": int32 [b, query_len], "query_mask": float32 [b, query_len],
              "doc": int32 [b, doc_len], "doc_mask": float32 [b, doc_len]}
    with CLS at position 0 of both; eval batches add "example_weights" float32 [b]
    (0 for padding rows, whose tokens are CLS then PAD with mask 1 on CLS only).

    Training: the B passages of step ``step`` are drawn without replacement
    (distinct within the batch, so in-batch negatives are true negatives) from the
    train passages by a generator keyed on (seed, step).
    Eval: ``max_eval_examples`` validation passages spread evenly over the whole
    validation split (all of them if unset), in corpus order. Taking the first
    ones instead would put a few documents' consecutive passages against each
    other: every candidate would be a near-duplicate topic, unlike the random
    in-batch negatives of training (recall@1 stayed near chance that way).
    Other arguments (global_batch_size, seed, val_fraction=0.05, eval_batch_size=None): see
    text.CorpusDataset.
    """

    name = "text_retrieval"
    task = "retrieval"

    def __init__(
        self,
        corpus: Corpus,
        *,
        query_len: int,
        doc_len: int,
        max_eval_examples: int | None = None,
        pairing: str = "halves",
        **common,
    ):
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing={pairing!r}; allowed: {', '.join(PAIRINGS)}")
        super().__init__(corpus, **common)
        self.pairing = pairing
        self.query_len = batching.check_int("query_len", query_len, minimum=2)
        self.doc_len = batching.check_int("doc_len", doc_len, minimum=2)
        self.max_eval_examples = batching.check_int("max_eval_examples", max_eval_examples, minimum=1, default=None)
        qb, db = self.query_len - 1, self.doc_len - 1
        self.train_passages, tail_t, drop_t = make_passages(self._documents(self.train_docs), qb, db)
        self.val_passages, tail_v, drop_v = make_passages(self._documents(self.val_docs), qb, db)
        self.unused_tail_bytes = tail_t + tail_v
        self.dropped_passages = drop_t + drop_v
        if len(self.train_passages) < self.global_batch_size:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} exceeds the {len(self.train_passages)} "
                f"train passages of corpus {corpus.path!r} at query_len={query_len}, doc_len={doc_len}"
            )
        if len(self.val_passages) == 0:
            raise ValueError(
                f"corpus {corpus.path!r} yields no validation passages at "
                f"query_len={query_len}, doc_len={doc_len}, val_fraction={self.val_fraction}"
            )
        self.num_eval = len(self.val_passages)
        if max_eval_examples is not None:
            self.num_eval = min(self.num_eval, max_eval_examples)
        # Evenly spaced, distinct, sorted indices into val_passages (all of them when num_eval = len).
        self.eval_indices = np.floor(np.arange(self.num_eval) * (len(self.val_passages) / self.num_eval)).astype(
            np.int64
        )
        self._eval_offsets = (
            None
            if pairing != "crops"
            else self._crop_offsets(batching.make_rng(batching.TAG_RETRIEVAL_EVAL, self.seed), self.num_eval)
        )

    def _crop_offsets(self, rng: np.random.Generator, k: int) -> tuple:
        """("crops") query starts in [0, W - qb] and doc starts in [0, W - db], int [k] each."""
        return rng.integers(0, self.doc_len, size=k), rng.integers(0, self.query_len, size=k)

    def _rows(self, passages: np.ndarray, offsets: tuple | None = None) -> dict:
        """passages uint8 [k, W] -> CLS-prefixed query/doc rows; offsets = (query, doc) crop starts."""
        k = passages.shape[0]
        qb, db = self.query_len - 1, self.doc_len - 1
        if self.pairing == "halves":
            q_bytes, d_bytes = passages[:, :qb], passages[:, qb:]
        else:
            a, b = offsets
            q_bytes = np.take_along_axis(passages, a[:, None] + np.arange(qb)[None], axis=1)
            d_bytes = np.take_along_axis(passages, b[:, None] + np.arange(db)[None], axis=1)
        cls = np.full((k, 1), CLS, np.int32)
        query = np.concatenate([cls, q_bytes.astype(np.int32)], axis=1)  # [k, Tq]
        doc = np.concatenate([cls, d_bytes.astype(np.int32)], axis=1)  # [k, Td]
        return {
            "query": query,
            "query_mask": np.ones(query.shape, np.float32),
            "doc": doc,
            "doc_mask": np.ones(doc.shape, np.float32),
        }

    def get_batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict:
        """Training pairs for ``step``: a pure function of (seed, step)."""
        step = batching.check_int("step", step, minimum=0)
        rows = batching.local_rows(self.global_batch_size, process_index, process_count)
        rng = batching.make_rng(batching.TAG_RETRIEVAL, self.seed, step)
        chosen = rng.choice(len(self.train_passages), size=self.global_batch_size, replace=False)
        if self.pairing == "crops":  # offsets for the whole global batch, so every process agrees
            out = self._rows(self.train_passages[chosen], self._crop_offsets(rng, self.global_batch_size))
            return {key: v[rows] for key, v in out.items()}
        return self._rows(self.train_passages[chosen[rows]])

    def _eval_rows(self, indices: np.ndarray) -> dict:
        offsets = None
        if self.pairing == "crops":  # each held-out passage's crops are fixed: drawn once for all, then indexed
            a, b = self._eval_offsets
            offsets = (a[indices], b[indices])
        out = self._rows(self.val_passages[self.eval_indices[indices]], offsets)
        out["example_weights"] = np.ones((len(indices),), np.float32)
        return out

    def _eval_padding(self, k: int) -> dict:
        def pad(length):
            toks = np.full((k, length), PAD, np.int32)
            toks[:, 0] = CLS
            mask = np.zeros((k, length), np.float32)
            mask[:, 0] = 1.0
            return toks, mask

        q, qm = pad(self.query_len)
        d, dm = pad(self.doc_len)
        return {"query": q, "query_mask": qm, "doc": d, "doc_mask": dm, "example_weights": np.zeros((k,), np.float32)}

    @property
    def num_eval_rows(self) -> int:
        """Held-out pairs used for evaluation (num_eval)."""
        return self.num_eval

    @property
    def metadata(self) -> dict:
        return self._metadata(
            ("query_len", "doc_len", "pairing", "max_eval_examples", "unused_tail_bytes", "dropped_passages"),
            train_passages=len(self.train_passages),
            val_passages=len(self.val_passages),
            eval_examples=self.num_eval,
        )


def retrieval_ranks(query_emb, doc_emb, *, weights=None, chunk: int = 1024) -> np.ndarray:
    """Rank of each valid query's positive among all valid docs: int64 [n_valid] (1 = top).

    Query i's positive is doc i; scores are dot products; ties count against the
    query: rank_i = 1 + #{j != i valid : s_ij >= s_ii}, so constant embeddings
    rank every positive last, not first. Rows with weight 0 (eval padding) are
    excluded both as queries and as candidates; nonzero weights count as 1.
    chunk queries are scored per block (bounds memory at chunk x n scores).
    """
    q = np.asarray(query_emb, np.float64)
    d = np.asarray(doc_emb, np.float64)
    if q.ndim != 2 or d.ndim != 2 or q.shape != d.shape:
        raise ValueError(f"query_emb and doc_emb must both be [n, d] with equal shapes, got {q.shape} and {d.shape}")
    valid = np.ones(q.shape[0], bool) if weights is None else np.asarray(weights).reshape(-1) != 0
    if valid.shape[0] != q.shape[0]:
        raise ValueError(f"weights must have shape [{q.shape[0]}], got {np.shape(weights)}")
    q, d = q[valid], d[valid]
    n = q.shape[0]
    if n == 0:
        raise ValueError("retrieval ranks: no valid queries (all weights are 0)")
    ranks = np.empty(n, np.int64)
    for s in range(0, n, chunk):
        scores = q[s : s + chunk] @ d.T  # [c, n]
        rows = np.arange(scores.shape[0])
        pos = scores[rows, s + rows]  # [c]
        ranks[s : s + chunk] = (scores >= pos[:, None]).sum(axis=1)  # counts j == i once: rank
    return ranks


def retrieval_metrics(query_emb, doc_emb, *, weights=None, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """Recall@k and MRR for paired embeddings; query i's positive is doc i.

    Every valid doc is a candidate for every valid query (in-batch candidates, or
    the whole held-out set); ranks as ``retrieval_ranks`` (ties count against the
    query, weight-0 rows dropped).

    Args:
      query_emb: float [n, d]; doc_emb: float [n, d] (numpy or jax arrays).
      weights: optional [n]; rows with weight 0 (eval padding) are excluded.
      ks: the k values of recall_at_k to report.
      chunk: queries scored per block.

    Returns:
      {"recall_at_{k}": float for k in ks, "mrr": float, "num_queries": int}.
    """
    return metrics_from_ranks(retrieval_ranks(query_emb, doc_emb, weights=weights, chunk=chunk), ks)


def metrics_from_ranks(ranks, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """{"recall_at_{k}", "mrr", "num_queries"} of positive ranks int [n] (as ``retrieval_ranks``)."""
    ranks = np.asarray(ranks)
    out = {f"recall_at_{k}": float(np.mean(ranks <= k)) for k in ks}
    out["mrr"] = float(np.mean(1.0 / ranks))
    out["num_queries"] = int(ranks.shape[0])
    return out


def paired_bootstrap(diffs, *, samples: int = 4000, seed: int = 0, level: float = 0.95) -> tuple:
    """Mean of per-stratum means of paired differences, with a bootstrap interval that resamples each stratum.

    diffs: a list of 1-D arrays [n_s], one per stratum (e.g. one per training seed, each over its own
    held-out queries); each resample draws n_s entries with replacement within every stratum, so pairs stay
    together and strata are weighted equally. Returns (mean, low, high): the central `level` interval.
    """
    diffs = [np.asarray(d, np.float64) for d in diffs]
    if not diffs or any(d.ndim != 1 or d.size == 0 for d in diffs):
        raise ValueError(
            f"diffs must be a non-empty list of non-empty 1-D arrays, got shapes {[d.shape for d in diffs]}"
        )
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} is not allowed: expected a fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    boots = np.zeros(samples)
    for s in range(0, samples, 500):  # 500 resamples per block
        block = min(500, samples - s)
        for d in diffs:
            idx = rng.integers(0, d.size, size=(block, d.size))
            boots[s : s + block] += d[idx].mean(axis=1) / len(diffs)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(boots, [tail, 100.0 - tail])
    return float(np.mean([d.mean() for d in diffs])), float(lo), float(hi)


def paired_recall_loss(
    base_ranks, ranks, *, k: int = 1, samples: int = 4000, seed: int = 0, level: float = 0.95
) -> dict:
    """Recall@k loss of a variant against a baseline on the same queries, with a paired bootstrap CI.

    Both rank arrays [n] index the same held-out queries, so the loss is the mean of per-query
    differences (hit_base - hit_variant), and its interval resamples queries, keeping each query's pair
    together: far tighter than comparing two independent recalls when the two models mostly agree.

    Returns {"loss_pts", "ci_low_pts", "ci_high_pts", "base_only", "variant_only"}: points (x100), the
    central `level` interval, and the counts of queries only the baseline / only the variant gets right.
    """
    a = np.asarray(base_ranks)
    b = np.asarray(ranks)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"base_ranks and ranks must be equal-length 1-D arrays, got {a.shape} and {b.shape}")
    diff = (a <= k).astype(np.float64) - (b <= k).astype(np.float64)  # [n] in {-1, 0, 1}
    mean, lo, hi = paired_bootstrap([diff], samples=samples, seed=seed, level=level)
    return {
        "loss_pts": 100.0 * mean,
        "ci_low_pts": 100.0 * float(lo),
        "ci_high_pts": 100.0 * float(hi),
        "base_only": int((diff > 0).sum()),
        "variant_only": int((diff < 0).sum()),
    }
