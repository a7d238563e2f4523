import numpy as np
import pytest

from effitrans.data import listops
from effitrans.data.tokenizer import CLS, PAD


def _reference_value(tokens):
    """Independent evaluator: repeatedly reduce the innermost bracket."""
    toks = list(tokens)
    while len(toks) > 1:
        end = toks.index("]")
        start = max(i for i in range(end) if toks[i].startswith("["))
        args = [int(t) for t in toks[start + 1 : end]]
        op = toks[start]
        val = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10, "[MED": int(np.median(args))}[op]
        toks[start : end + 1] = [str(val)]
    return int(toks[0])


def test_labels_lengths_depths():
    ds = listops.ListOpsDataset(seq_len=129, global_batch_size=16, seed=5, min_len=20, max_len=128, num_eval_examples=8)
    for step in range(3):
        b = ds.get_batch(step)
        for row, label in zip(b["inputs"], b["labels"]):
            assert row[0] == CLS
            ids = row[row != PAD][1:]
            assert 20 <= len(ids) <= 128
            s = listops.ids_to_string(ids)
            tree = listops.parse(s)
            assert listops.evaluate(tree) == label == _reference_value(s.split())
            assert listops.tree_depth(tree) <= 10
            np.testing.assert_array_equal(listops.string_to_ids(s), ids)
        np.testing.assert_array_equal(b["weights"], (b["inputs"] != PAD).astype(np.float32))


def test_lra_defaults_fast_and_in_range():
    rng = np.random.default_rng(0)
    depths = []
    for _ in range(40):
        ids, label, depth = listops.sample_example(rng, min_len=500, max_len=2000)
        assert 500 <= len(ids) <= 2000 and 0 <= label < 10
        tree = listops.parse(listops.ids_to_string(ids))
        assert listops.tree_depth(tree) == depth <= 10
        assert listops.evaluate(tree) == label
        depths.append(depth)
    assert max(depths) == 10  # long trees reach the depth cap


def test_parse_lra_format_with_parentheses():
    s = "( ( ( [MAX 2 9 ) ( ( [MED 1 4 3 8 ] ) ) ) ]"
    assert listops.evaluate(listops.parse(s)) == 9
    assert listops.apply_op("[MED", [1, 4, 3, 8]) == 3  # int(np.median) = int(3.5)
    assert listops.apply_op("[SM", [9, 8]) == 7
    with pytest.raises(ValueError):
        listops.parse("[MAX 1 2")


def test_eval_set_is_seed_independent():
    kw = dict(seq_len=40, global_batch_size=4, min_len=5, max_len=39, num_eval_examples=6)
    a = list(listops.ListOpsDataset(seed=0, **kw).eval_batches())
    b = list(listops.ListOpsDataset(seed=1, **kw).eval_batches())
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    c = list(listops.ListOpsDataset(seed=0, eval_seed=1, **kw).eval_batches())
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="seq_len"):
        listops.ListOpsDataset(seq_len=100, global_batch_size=2, seed=0, min_len=10, max_len=100)
    with pytest.raises(ValueError, match="min_len"):
        listops.ListOpsDataset(seq_len=100, global_batch_size=2, seed=0, min_len=50, max_len=10)
