"""Attention kernels: pure functions on arrays (no Flax).

``attention(q, k, v, mask=..., impl=...)`` with implementations reference / xla / pallas, and
``decode_attention(q, k_cache, v_cache, lengths=...)`` for few queries against a KV cache.
``masks`` holds the composable mask objects and their block maps. See docs/kernels.md.
"""

from effitrans.kernels import masks
from effitrans.kernels.api import attention, decode_attention, normalize_segment_ids

__all__ = ["attention", "decode_attention", "masks", "normalize_segment_ids"]
