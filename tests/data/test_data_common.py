"""Contract tests shared by every dataset: determinism, process slicing, eval coverage."""

import json

import ml_collections
import numpy as np
import pytest

from effitrans.data import batching, build_dataset, tokenizer

# Small configs for every dataset (the text ones use the pydoc fallback: small and always present).
CONFIGS = {
    "text_lm": dict(
        name="text_lm", seq_len=64, corpus_path="pydoc_data.topics", val_fraction=0.1, max_eval_batches=None
    ),
    "text_retrieval": dict(
        name="text_retrieval",
        query_len=16,
        doc_len=24,
        corpus_path="pydoc_data.topics",
        val_fraction=0.1,
        max_eval_examples=37,
    ),
    "listops": dict(name="listops", seq_len=64, min_len=10, max_len=60, num_eval_examples=21),
    "copy": dict(name="copy", seq_len=24, max_copy_len=10, num_eval_examples=19),
    "associative_recall": dict(name="associative_recall", seq_len=24, num_pairs=5, num_eval_examples=19),
}
B = 8


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ds(request):
    return build_dataset(ml_collections.ConfigDict(CONFIGS[request.param]), global_batch_size=B, seed=3)


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_determinism_independent_of_call_order(ds):
    first = [ds.get_batch(s) for s in (5, 0, 7)]
    ds.get_batch(123)
    again = [ds.get_batch(s) for s in (7, 5, 0)]
    for a, b in zip(first, [again[1], again[2], again[0]]):  # steps 5, 0, 7
        _equal(a, b)
    key = next(iter(first[0]))
    assert not np.array_equal(ds.get_batch(1)[key], ds.get_batch(2)[key])


def test_same_seed_new_object_same_batch(ds):
    cfg = CONFIGS[ds.metadata["name"]]
    other = build_dataset(ml_collections.ConfigDict(cfg), global_batch_size=B, seed=3)
    _equal(ds.get_batch(11), other.get_batch(11))
    different = build_dataset(ml_collections.ConfigDict(cfg), global_batch_size=B, seed=4)
    key = next(iter(ds.get_batch(0)))
    assert not np.array_equal(ds.get_batch(11)[key], different.get_batch(11)[key])


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_concatenate_to_global_batch(ds, count):
    full = ds.get_batch(9)
    parts = [ds.get_batch(9, process_index=p, process_count=count) for p in range(count)]
    for k in full:
        assert all(p[k].shape[0] == B // count for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_indivisible_batch_raises(ds):
    with pytest.raises(ValueError, match=r"8.*process_count=3"):
        ds.get_batch(0, process_index=0, process_count=3)


def test_shapes_dtypes_and_task_keys(ds):
    b = ds.get_batch(0)
    ints = {k for k, v in b.items() if v.dtype == np.int32}
    floats = {k for k, v in b.items() if v.dtype == np.float32}
    assert ints | floats == set(b)
    for v in b.values():
        assert v.shape[0] == B
    if ds.task == "lm":
        assert set(b) == {"inputs", "targets", "weights"}
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape
    elif ds.task == "classification":
        assert {"inputs", "weights", "mask", "labels", "example_weights"} <= set(b)
        assert (b["inputs"][:, 0] == tokenizer.CLS).all()
        assert b["labels"].shape == (B,)
    else:
        assert set(b) == {"query", "query_mask", "doc", "doc_mask"}
        assert (b["query"][:, 0] == tokenizer.CLS).all() and (b["doc"][:, 0] == tokenizer.CLS).all()
    for v in b.values():
        if v.dtype == np.int32:
            assert v.min() >= 0 and v.max() < tokenizer.VOCAB_SIZE


def _eval_weight_key(ds):
    return "weights" if ds.task == "lm" else "example_weights"


def test_eval_covers_held_out_set_with_zero_weight_padding(ds):
    batches = list(ds.eval_batches())
    again = list(ds.eval_batches())
    assert len(batches) == len(again)
    for a, b in zip(batches, again):
        _equal(a, b)
    for b in batches:
        assert all(v.shape[0] == ds.metadata["eval_batch_size"] for v in b.values())
    key = _eval_weight_key(ds)
    w = np.concatenate([b[key] for b in batches])
    if ds.task == "lm":
        row_has_weight = w.sum(axis=1) > 0
        n_real = int(row_has_weight.sum())
        # Padding rows (weight 0) only at the end, fewer than one batch of them.
        assert row_has_weight[:n_real].all() and not row_has_weight[n_real:].any()
        assert len(w) - n_real < ds.metadata["eval_batch_size"]
    else:
        n_real = int(w.sum())
        expected = {"text_retrieval": "eval_examples"}.get(ds.metadata["name"], "num_eval_examples")
        assert n_real == ds.metadata[expected]
        assert (w[:n_real] == 1).all() and (w[n_real:] == 0).all()
        assert len(w) - n_real < ds.metadata["eval_batch_size"]
        assert len(w) > n_real  # the configs above leave a partial last batch


def test_eval_process_slices(ds):
    full = list(ds.eval_batches())
    parts = [list(ds.eval_batches(process_index=p, process_count=2)) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(full)
    for i, f in enumerate(full):
        for k in f:
            np.testing.assert_array_equal(np.concatenate([parts[0][i][k], parts[1][i][k]]), f[k])


def test_metadata_is_json(ds):
    meta = ds.metadata
    json.dumps(meta)
    assert meta["task"] == ds.task
    assert meta["name"] in CONFIGS
    assert "corpus_path" in meta


def test_negative_step_raises(ds):
    with pytest.raises(ValueError, match="step"):
        ds.get_batch(-1)


def test_shared_fields_are_checked_for_every_dataset(ds):
    # global_batch_size, seed and eval_batch_size are validated once, in batching.BatchedDataset.
    cfg = ml_collections.ConfigDict(CONFIGS[ds.metadata["name"]])
    with pytest.raises(ValueError, match="global_batch_size"):
        build_dataset(cfg, global_batch_size=0, seed=3)
    with pytest.raises(ValueError, match="seed"):
        build_dataset(cfg, global_batch_size=B, seed=-1)
    assert ds.eval_batch_size == B  # eval_batch_size None means global_batch_size
    assert {"name", "task", "vocab_size", "global_batch_size", "eval_batch_size", "seed"} <= ds.metadata.keys()


def test_check_int_default_stands_in_for_none_only():
    assert batching.check_int("n", None, minimum=1, default=7) == 7
    assert batching.check_int("n", None, minimum=1, default=None) is None
    assert batching.check_int("n", 3, minimum=1, default=None) == 3
    with pytest.raises(TypeError, match="n must be an int"):
        batching.check_int("n", None, minimum=1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        batching.check_int("n", 0, minimum=1, default=None)
