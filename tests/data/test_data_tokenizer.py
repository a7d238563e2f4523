import numpy as np
import pytest

from effitrans.data import tokenizer as tok


def test_constants():
    assert (tok.PAD, tok.BOS, tok.EOS, tok.CLS, tok.MASK, tok.VOCAB_SIZE) == (256, 257, 258, 259, 260, 261)


def test_round_trip_unicode():
    text = "héllo wörld — ∑ 😀\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    wrapped = tok.encode(text, add_bos=True, add_eos=True)
    assert wrapped[0] == tok.BOS and wrapped[-1] == tok.EOS
    assert tok.decode(np.concatenate([wrapped, [tok.PAD, tok.CLS, tok.MASK]])) == text


def test_decode_invalid_utf8_replaces_and_rejects_out_of_range():
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    with pytest.raises(ValueError, match="261"):
        tok.decode([261])
