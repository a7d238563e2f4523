import os

import ml_collections
import numpy as np
import pytest

from effitrans.data import build_dataset, text
from effitrans.data.tokenizer import EOS, PAD


@pytest.fixture(scope="module")
def fallback():
    return text.load_corpus("pydoc_data.topics")


def test_fallback_corpus(fallback):
    assert fallback.source == "pydoc_data.topics"
    assert len(fallback.names) > 20 and list(fallback.names) == sorted(fallback.names)
    assert all(d.strip() for d in fallback.documents)
    assert len(fallback.sha256) == 64


def test_sha256_stable_and_content_sensitive(tmp_path, fallback):
    assert text.load_corpus("pydoc_data.topics").sha256 == fallback.sha256
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.rst.txt").write_text("beta text\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    c1 = text.load_corpus(str(tmp_path))
    assert c1.names == ("a.txt", "sub/b.rst.txt")
    assert c1.sha256 == text.load_corpus(str(tmp_path)).sha256
    import hashlib

    h = hashlib.sha256()
    for name, data in [("a.txt", b"alpha text\n"), ("sub/b.rst.txt", b"beta text\n")]:
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    assert c1.sha256 == h.hexdigest()
    (tmp_path / "a.txt").write_text("alpha text!\n")
    assert text.load_corpus(str(tmp_path)).sha256 != c1.sha256


def test_bad_corpus_path_raises_naming_it(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        text.load_corpus(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        text.load_corpus(str(empty))
    with pytest.raises(ValueError, match="nope"):
        build_dataset(ml_collections.ConfigDict(dict(name="text_lm", corpus_path=missing)), global_batch_size=2, seed=0)


def test_split_disjoint_deterministic_seed_independent(fallback):
    train, val = text.split_documents(fallback, 0.2)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(fallback.names)
    assert len(val) == round(0.2 * len(fallback.names))
    t2, v2 = text.split_documents(fallback, 0.2)
    np.testing.assert_array_equal(val, v2)
    a = text.TextLMDataset(fallback, seq_len=32, global_batch_size=4, seed=0, val_fraction=0.2)
    b = text.TextLMDataset(fallback, seq_len=32, global_batch_size=4, seed=1, val_fraction=0.2)
    np.testing.assert_array_equal(a.val_docs, b.val_docs)


def test_train_windows_come_from_train_documents_only(fallback):
    ds = text.TextLMDataset(fallback, seq_len=48, global_batch_size=16, seed=0, val_fraction=0.2)
    train_text = b"\xff".join(fallback.data[i] for i in ds.train_docs)
    for step in range(3):
        batch = ds.get_batch(step)
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        for row in batch["inputs"]:
            for piece in np.split(row, np.where(row == EOS)[0]):
                p = bytes(int(x) for x in piece if x != EOS)
                if len(p) > 8:
                    assert p in train_text


def test_eval_windows_cover_validation_stream_exactly(fallback):
    ds = text.TextLMDataset(fallback, seq_len=40, global_batch_size=6, seed=0, val_fraction=0.2)
    tgt, w, inp = [], [], []
    for b in ds.eval_batches():
        tgt.append(b["targets"].reshape(-1))
        inp.append(b["inputs"].reshape(-1))
        w.append(b["weights"].reshape(-1))
    tgt, w, inp = np.concatenate(tgt), np.concatenate(w), np.concatenate(inp)
    np.testing.assert_array_equal(tgt[w > 0], ds.val_stream[1:].astype(np.int32))
    assert (tgt[w == 0] == PAD).all()
    assert int(w.sum()) == len(ds.val_stream) - 1
    assert ds.metadata["eval_windows"] == ds.metadata["eval_windows_total"]
    capped = text.TextLMDataset(fallback, seq_len=40, global_batch_size=6, seed=0, val_fraction=0.2, max_eval_batches=2)
    assert len(list(capped.eval_batches())) == 2 and capped.metadata["eval_windows"] == 12


def test_unigram_entropy(fallback):
    assert text.unigram_entropy_bits(b"abab") == pytest.approx(1.0)
    assert text.unigram_entropy_bits("aaaa") == pytest.approx(0.0)
    h = text.unigram_entropy_bits(fallback, val_fraction=0.2)
    assert 3.0 < h < 6.0


@pytest.mark.skipif(not os.path.isdir(text.DEFAULT_CORPUS_DIR), reason="CPython docs not installed")
def test_default_corpus_is_cpython_docs():
    c = text.load_corpus()
    assert c.path == text.DEFAULT_CORPUS_DIR and c.source == "directory"
    assert len(c.names) > 400 and all(n.endswith(".rst.txt") for n in c.names)
