"""Byte-level tokenizer shared by every effitrans dataset.

Ids 0..255 are the raw UTF-8 bytes of the text; five special ids follow them.
Every dataset in ``effitrans.data`` emits ids in ``[0, VOCAB_SIZE)``, so a
model built with ``vocab_size=VOCAB_SIZE`` can consume any of them.
"""

from __future__ import annotations

import numpy as np

NUM_BYTES = 256
PAD = 256  # padding; always carries weight 0
BOS = 257  # beginning of sequence
EOS = 258  # end of sequence / document separator
CLS = 259  # classification / pooling token, placed at position 0
MASK = 260  # masked position (and the separator of the synthetic copy task)
VOCAB_SIZE = 261

SPECIAL_TOKENS = {"PAD": PAD, "BOS": BOS, "EOS": EOS, "CLS": CLS, "MASK": MASK}


def encode(text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """UTF-8 bytes of ``text`` as ids.

    Args:
      text: a Python string.
      add_bos: prepend BOS.
      add_eos: append EOS.

    Returns:
      int32 [n] with n = len(text.encode("utf-8")) + add_bos + add_eos.
    """
    if not isinstance(text, str):
        raise TypeError(f"encode(text=...) expects str, got {type(text).__name__}")
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    parts = []
    if add_bos:
        parts.append(np.array([BOS], np.int32))
    parts.append(ids)
    if add_eos:
        parts.append(np.array([EOS], np.int32))
    return np.concatenate(parts) if len(parts) > 1 else ids


def decode(ids) -> str:
    """Inverse of ``encode``: special ids (>= 256) are skipped.

    Args:
      ids: any integer array-like of shape [n] (extra dims are flattened).

    Returns:
      The text, with invalid UTF-8 replaced by U+FFFD (errors="replace").
    """
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(
            f"decode(ids=...) got ids outside [0, {VOCAB_SIZE}): min={int(arr.min())}, max={int(arr.max())}"
        )
    data = arr[arr < NUM_BYTES].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")
