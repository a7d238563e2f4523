"""Block-sparse flash attention (online softmax) as Pallas kernels, forward and backward.

Entry point: ``pallas_attention(q, k, v, *, mask, segment_ids, scale, block_q, block_k, return_lse,
interpret, platform=None)``; ``kernels.attention(..., impl="pallas")`` calls it.

Shapes (letters as in DESIGN.md): q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], N = K * G.
Query head n reads kv head n // G through the kv BlockSpec's index map, so k and v are never
repeated in memory. Which tiles are visited comes from ``masks.mask_info`` (block lists per q block
and per kv block); docs/pallas.md has the full picture.

Modules:
  common.py  static Config, the element mask of one tile, float32 tile products, the mask value.
  tpu.py     scalar-prefetch formulation (Mosaic; also the CPU ``interpret=True`` path).
  gpu.py     Triton formulation (lists as inputs, one loop per program).
  vjp.py     the custom VJP over padded head-major arrays and the public entry ``pallas_attention``.

Numerics: logits, the running max m, running sum l and the accumulators are float32; p is cast to
v's dtype before the p @ v product (as every flash kernel does). A row with no allowed key keeps
l = 0: its output is 0 and its internal logsumexp is +inf, which makes the recomputed probabilities
exp(s - lse) exactly 0 in the backward, so its gradients are 0 and finite. The public lse of such a
row is -inf (log of an empty sum).
"""

from effitrans.kernels.pallas.vjp import pallas_attention

__all__ = ["pallas_attention"]
