"""What the TPU and GPU formulations share: the static configuration, the element mask of one tile,
the float32 tile products and the mask value.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effitrans.kernels import masks as masks_lib

# Masked logits take a large finite value rather than -inf so that m - s and exp(m_prev - m_new)
# never form inf - inf = nan, even for rows that have seen no allowed key yet.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

PLATFORMS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration shared by the forward and backward passes (hashable: a jit static)."""

    mask: Any
    scale: float
    block_q: int
    block_k: int
    q_len: int  # true lengths (before padding to block multiples)
    kv_len: int
    num_groups: int  # G = N // K
    has_segments: bool
    platform: str  # 'tpu' or 'gpu'
    interpret: bool

    def info(self) -> masks_lib.MaskInfo:
        """Block lists for this mask and shape (rows for forward/dq, cols for dk/dv), cached."""
        return masks_lib.mask_info(self.mask, self.q_len, self.kv_len, self.block_q, self.block_k, self.has_segments)


def allowed(cfg: Config, q_block, kv_block, q_seg, kv_seg):
    """bool [bq, bk]: mask_fn, padding bounds and segment equality for one (q block, kv block).

    q_seg: int32 [bq, 1] or None; kv_seg: int32 [1, bk] or None.
    """
    shape = (cfg.block_q, cfg.block_k)
    q_pos = q_block * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)  # [bq, bk]
    kv_pos = kv_block * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)  # [bq, bk]
    ok = cfg.mask.mask_fn(q_pos, kv_pos)
    # Padding rows/columns (past the true lengths) never take part.
    ok = ok & (q_pos < cfg.q_len) & (kv_pos < cfg.kv_len)
    if q_seg is not None:
        ok = ok & (q_seg == kv_seg)
    return ok


def split_refs(refs, has_segments):
    """Pops the two optional segment refs off the front of a kernel's array refs."""
    if has_segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def dot_nt(a, b):
    """a [m, d] . b [n, d]^T -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """a [d, m]^T . b [d, n] -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a [m, d] . b [d, n] -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
