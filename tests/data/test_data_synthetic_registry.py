import types

import ml_collections
import numpy as np
import pytest

from effitrans.data import build_dataset, registry, synthetic
from effitrans.data.tokenizer import BOS, PAD


def test_copy_weights_only_on_copy():
    ds = synthetic.CopyDataset(seq_len=30, global_batch_size=16, seed=0, min_copy_len=2, max_copy_len=12, num_symbols=5)
    b = ds.get_batch(4)
    for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
        assert inp[0] == BOS
        sep = int(np.where(inp == synthetic.SEPARATOR)[0][0])
        x = inp[1:sep]
        assert 2 <= len(x) <= 12 and x.max() < 5
        np.testing.assert_array_equal(tgt[w > 0], x)
        assert int(w.sum()) == len(x) and w[sep] == 1 and w[sep - 1] == 0


def test_associative_recall_target_is_value_of_query():
    ds = synthetic.AssociativeRecallDataset(
        seq_len=20, global_batch_size=16, seed=0, num_pairs=6, num_keys=10, num_values=7
    )
    b = ds.get_batch(0)
    for inp, tgt, w in zip(b["inputs"], b["targets"], b["weights"]):
        keys, values = inp[1:13:2], inp[2:13:2]
        assert len(set(keys.tolist())) == 6
        pos = int(np.argmax(w))
        assert w.sum() == 1 and pos == 13
        q = inp[pos]
        assert tgt[pos] == values[list(keys).index(q)]
        assert (inp[pos + 2 :] == PAD).all()


def test_registry_unknown_name_and_field():
    with pytest.raises(ValueError, match=r"name='nope'.*allowed"):
        build_dataset(ml_collections.ConfigDict({"name": "nope"}), global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="max_copy_lenn"):
        build_dataset({"name": "copy", "max_copy_lenn": 3}, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        build_dataset(
            {"name": "text_lm", "corpus_path": "pydoc_data.topics", "val_fraction": 1.5}, global_batch_size=2, seed=0
        )


def test_registry_accepts_attribute_objects_and_defaults():
    ds = build_dataset(types.SimpleNamespace(name="associative_recall", seq_len=32), global_batch_size=4, seed=0)
    assert ds.metadata["num_pairs"] == registry.DATA_KEYS["associative_recall"]["num_pairs"].default
    assert ds.metadata["seq_len"] == 32
    for name in registry.DATASET_NAMES:
        assert set(registry.DATA_KEYS[name]) >= {"eval_batch_size"}
