import numpy as np
import pytest

from effitrans.data import retrieval, text
from effitrans.data.tokenizer import CLS, decode


def test_metrics_hand_made():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    # scores: q0 -> [1, 1, 1] ties -> rank 3; q1 -> [0, 0, 1] -> rank 3 (doc2 higher, doc0 tie);
    # q2 -> [1, 1, 2] -> rank 1.
    m = retrieval.retrieval_metrics(q, d, ks=(1, 2))
    assert m["recall_at_1"] == pytest.approx(1 / 3)
    assert m["recall_at_2"] == pytest.approx(1 / 3)
    assert m["mrr"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert m["num_queries"] == 3


def test_metrics_perfect_and_weights_and_chunking():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)  # unit vectors: self is the unique best match
    m = retrieval.retrieval_metrics(e * 10, e * 10, chunk=7)
    assert m["recall_at_1"] == 1.0 and m["mrr"] == 1.0
    # A bad pair masked out by weight 0 does not count as query or candidate.
    d = e.copy()
    d[3] = 100 * e[4]
    w = np.ones(50)
    w[3] = 0
    assert retrieval.retrieval_metrics(e, d, weights=w)["recall_at_1"] == 1.0
    assert retrieval.retrieval_metrics(e, d)["recall_at_1"] < 1.0
    const = np.ones((4, 3))
    assert retrieval.retrieval_metrics(const, const)["recall_at_1"] == 0.0


def test_pairs_are_halves_of_one_passage():
    corpus = text.load_corpus("pydoc_data.topics")
    ds = retrieval.TextRetrievalDataset(corpus, query_len=12, doc_len=20, global_batch_size=8, seed=0, val_fraction=0.1)
    b = ds.get_batch(2)
    val_text = b"".join(corpus.data[i] for i in ds.val_docs)
    train_text = b"".join(corpus.data[i] for i in ds.train_docs)
    for qrow, drow in zip(b["query"], b["doc"]):
        assert qrow[0] == CLS and drow[0] == CLS
        joined = bytes(int(x) for x in qrow[1:]) + bytes(int(x) for x in drow[1:])
        assert joined in train_text
    # Distinct passages within a batch (in-batch negatives are true negatives).
    assert len({bytes(r.astype(np.uint8)) for r in b["query"][:, 1:]}) == 8
    for eb in ds.eval_batches():
        for qrow, drow, w in zip(eb["query"], eb["doc"], eb["example_weights"]):
            if w:
                joined = bytes(int(x) for x in qrow[1:]) + bytes(int(x) for x in drow[1:])
                assert joined in val_text
        break
    assert decode(b["query"][0])  # printable


def test_capped_eval_set_spreads_over_the_validation_split():
    corpus = text.load_corpus("pydoc_data.topics")
    kw = dict(query_len=12, doc_len=20, global_batch_size=8, seed=0, val_fraction=0.1)
    full = retrieval.TextRetrievalDataset(corpus, **kw)
    capped = retrieval.TextRetrievalDataset(corpus, max_eval_examples=10, **kw)
    n = len(full.val_passages)
    assert capped.num_eval == 10 and n > 100
    idx = capped.eval_indices
    assert len(set(idx.tolist())) == 10 and idx[0] == 0 and idx[-1] >= n - n // 10 - 1
    rows = [r for b in capped.eval_batches() for r, w in zip(b["query"], b["example_weights"]) if w]
    np.testing.assert_array_equal(np.stack(rows)[:, 1:], full.val_passages[idx, :11])
    np.testing.assert_array_equal(full.eval_indices, np.arange(n))  # uncapped: every passage, in order


def _bytes(row) -> bytes:
    return bytes(int(x) for x in row[1:])


def test_crop_pairs_are_crops_of_one_passage_and_eval_crops_are_fixed():
    corpus = text.load_corpus("pydoc_data.topics")
    kw = dict(query_len=12, doc_len=20, global_batch_size=8, seed=3, val_fraction=0.1, pairing="crops")
    ds = retrieval.TextRetrievalDataset(corpus, **kw)
    passages = [bytes(p) for p in ds.train_passages]  # each 11 + 19 = 30 bytes
    starts = set()
    for step in range(4):
        b = ds.get_batch(step)
        assert b["query"].shape == (8, 12) and b["doc"].shape == (8, 20)
        for qrow, drow in zip(b["query"], b["doc"]):
            assert qrow[0] == CLS and drow[0] == CLS
            q, d = _bytes(qrow), _bytes(drow)
            owners = [p for p in passages if q in p and d in p]
            assert owners, (q, d)
            starts.add(owners[0].index(q))
        # Process slices of a global batch concatenate to it (offsets drawn for the whole batch).
        halves = [ds.get_batch(step, process_index=i, process_count=2) for i in range(2)]
        np.testing.assert_array_equal(np.concatenate([h["query"] for h in halves]), b["query"])
        np.testing.assert_array_equal(np.concatenate([h["doc"] for h in halves]), b["doc"])
    assert len(starts) > 3  # query starts range over [0, 19]
    assert max(starts) <= 19
    # Eval crops depend only on the seed and the held-out passage: same in a fresh dataset and a second pass.
    first = list(ds.eval_batches())
    again = list(retrieval.TextRetrievalDataset(corpus, **kw).eval_batches())
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    val = [bytes(p) for p in ds.val_passages]
    for qrow, drow, w in zip(first[0]["query"], first[0]["doc"], first[0]["example_weights"]):
        if w:
            assert any(_bytes(qrow) in p and _bytes(drow) in p for p in val)
    assert ds.metadata["pairing"] == "crops"


def test_unknown_pairing_is_rejected():
    corpus = text.load_corpus("pydoc_data.topics")
    with pytest.raises(ValueError, match="pairing='thirds'; allowed: halves, crops"):
        retrieval.TextRetrievalDataset(corpus, query_len=12, doc_len=20, global_batch_size=8, seed=0, pairing="thirds")


def test_ranks_match_metrics_and_paired_loss_by_hand():
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    ranks = retrieval.retrieval_ranks(q, d, chunk=9)
    m = retrieval.retrieval_metrics(q, d)
    assert m["recall_at_1"] == np.mean(ranks == 1) and m["mrr"] == pytest.approx(np.mean(1 / ranks))
    base = np.array([1, 1, 1, 1, 2, 3, 1, 5])  # hits: 1 1 1 1 0 0 1 0
    var = np.array([1, 1, 2, 1, 1, 3, 4, 7])  # hits: 1 1 0 1 1 0 0 0
    out = retrieval.paired_recall_loss(base, var, samples=2000)
    # per-query base - variant: 0 0 1 0 -1 0 1 0 -> mean 1/8
    assert out["loss_pts"] == pytest.approx(12.5) and (out["base_only"], out["variant_only"]) == (2, 1)
    assert out["ci_low_pts"] < 12.5 < out["ci_high_pts"]
    # On many queries the bootstrap interval matches the normal one, mean +- 1.96 sd / sqrt(n).
    base = rng.integers(1, 3, size=3000)
    var = np.where(rng.random(3000) < 0.1, 3 - base, base)  # 10% of queries flip between hit and miss
    out = retrieval.paired_recall_loss(base, var)
    diff = 100.0 * ((base == 1).astype(float) - (var == 1))
    half = 1.96 * diff.std() / np.sqrt(diff.size)
    assert out["loss_pts"] == pytest.approx(diff.mean())
    assert out["ci_high_pts"] - out["ci_low_pts"] == pytest.approx(2 * half, rel=0.1)
    same = retrieval.paired_recall_loss(base, base)  # identical models: zero loss, zero width
    assert same["loss_pts"] == same["ci_low_pts"] == same["ci_high_pts"] == 0.0
    with pytest.raises(ValueError, match="equal-length"):
        retrieval.paired_recall_loss(base, var[:-1])
