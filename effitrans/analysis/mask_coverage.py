"""Which `kernels.masks` pattern keeps a layer's attention: candidates, coverage vs density, a recommendation,
and running a model under per-layer masks without retraining.

Coverage of a mask = the share of a head's attention mass (probabilities summed over query rows) on the
pairs the mask keeps; density = kept pairs / the pairs the layer's own mask allows (the work it costs).
A layer takes one mask for all its heads, so its coverage is the mean over heads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from effitrans.analysis.attention_maps import attention_modules
from effitrans.kernels import masks as masks_lib

# Coverage within this of the threshold counts as reaching it (float32 sums of probabilities that add to 1).
COVERAGE_TOLERANCE = 1e-6
FULL = "full"
_UNSET = object()


def check_threshold(threshold) -> float:
    """A coverage threshold X in (0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"coverage threshold must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


def window_mask(width: int, *, causal: bool) -> masks_lib.Mask:
    """A sliding window of `width` keys including the query: causal looks back only, else width // 2 each side."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"window width must be an int >= 1, got {width!r}")
    return masks_lib.SlidingWindow(width - 1, 0) if causal else masks_lib.SlidingWindow(width // 2, width // 2)


def candidate_masks(
    seq_len: int,
    *,
    causal: bool,
    windows: Sequence[int] = (8, 16, 32, 64, 128, 256, 512),
    sinks: Sequence[int] = (1, 4),
    strides: Sequence[int] = (16, 32, 64),
    blocks: Sequence[int] = (32, 64, 128),
    summary: int = 4,
) -> dict[str, masks_lib.Mask]:
    """Named candidate patterns for length `seq_len`: windows, sink tokens + window, strided, fixed, chunked
    and sinks + strided / chunked (strided and fixed are causal patterns: only for causal models), ending
    with "full" (everything the layer allows). Patterns as wide as the sequence are left out."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    out: dict[str, masks_lib.Mask] = {}
    for w in (w for w in windows if w < seq_len):
        out[f"window{w}"] = window_mask(w, causal=causal)
        for g in sinks:
            out[f"sink{g}+window{w}"] = masks_lib.GlobalTokens(g) | window_mask(w, causal=causal)
    for b in (b for b in blocks if b < seq_len):
        out[f"chunk{b}"] = masks_lib.Chunked(b)
        for g in sinks:
            out[f"sink{g}+chunk{b}"] = masks_lib.GlobalTokens(g) | masks_lib.Chunked(b)
    if causal:
        for l in (l for l in strides if l < seq_len):
            out[f"strided{l}"] = masks_lib.Strided(l)
            for g in sinks:
                out[f"sink{g}+strided{l}"] = masks_lib.GlobalTokens(g) | masks_lib.Strided(l)
        for b in (b for b in blocks if b < seq_len):
            out[f"fixed{b}/{min(summary, b)}"] = masks_lib.Fixed(b, min(summary, b))
    out[FULL] = masks_lib.Full()
    return out


def recommend(coverage, density, names: Sequence[str], threshold: float) -> list[dict]:
    """Per layer the cheapest pattern whose coverage reaches `threshold` (ties: the higher coverage).

    coverage [L, M] (layer coverage: mean over heads), density [M] or per layer [L, M], names: the M pattern
    names (one of them "full", which always qualifies). Returns one {"layer", "pattern", "coverage",
    "density"} per layer.
    """
    threshold = check_threshold(threshold)
    coverage = np.asarray(coverage, np.float64)
    names = list(names)
    if coverage.ndim != 2 or coverage.shape[1] != len(names):
        raise ValueError(f"coverage must be [layers, {len(names)}] (one column per name), got {coverage.shape}")
    density = np.asarray(density, np.float64)
    if density.shape not in ((len(names),), coverage.shape):
        raise ValueError(f"density must be [{len(names)}] or {list(coverage.shape)}, got {list(density.shape)}")
    density = np.broadcast_to(density, coverage.shape)
    if FULL not in names:
        raise ValueError(f"names must include {FULL!r} (the fallback every layer can take), got {names}")
    out = []
    for layer, (row, cost) in enumerate(zip(coverage, density)):
        ok = [m for m in range(len(names)) if row[m] >= threshold - COVERAGE_TOLERANCE or names[m] == FULL]
        best = min(ok, key=lambda m: (cost[m], -row[m]))
        out.append({"layer": layer, "pattern": names[best], "coverage": float(row[best]), "density": float(cost[best])})
    return out


def window_density(width: int, seq_len: int, *, causal: bool) -> float:
    """Density of `window_mask(width)` on a seq_len self-attention: kept pairs / the pairs of Causal (or Full)."""
    i = np.arange(seq_len)
    if causal:
        return float(np.minimum(i + 1, width).sum() / (seq_len * (seq_len + 1) / 2))
    half = width // 2
    kept = np.minimum(i, half) + np.minimum(seq_len - 1 - i, half) + 1
    return float(kept.sum() / seq_len**2)


def window_of_density(target: float, seq_len: int, *, causal: bool) -> tuple[int, float]:
    """(width, density) of the narrowest window whose density is at least `target` (in (0, 1])."""
    target = check_threshold(target)
    for width in range(1, 2 * seq_len + 1):
        d = window_density(width, seq_len, causal=causal)
        if d >= target - COVERAGE_TOLERANCE:
            return width, d
    raise AssertionError("a window of twice the length covers everything")  # unreachable


@contextlib.contextmanager
def layer_masks(model, per_layer: Sequence[masks_lib.Mask | None]):
    """Runs `model` with layer i's causal / full mask intersected with per_layer[i] (None or Full: nothing),
    in place of any `extra_mask` the layers had, which is restored on exit. The masks are static: a jitted
    forward compiles once per set of masks."""
    modules = attention_modules(model)
    per_layer = list(per_layer)
    if len(per_layer) != len(modules):
        raise ValueError(f"per_layer must hold one mask (or None) per layer: {len(modules)}, got {len(per_layer)}")
    for i, mask in enumerate(per_layer):
        if mask is not None and not isinstance(mask, masks_lib.Mask):
            raise TypeError(f"per_layer[{i}] must be a kernels.masks.Mask or None, got {type(mask).__name__}")
    # A layer without its own extra_mask gets the attribute removed again, so its graph (and any jitted
    # forward compiled for it) is the one it had before.
    saved = [vars(attn).get("extra_mask", _UNSET) for attn in modules]
    try:
        for attn, mask in zip(modules, per_layer):
            attn.extra_mask = None if isinstance(mask, masks_lib.Full) else mask
        yield model
    finally:
        for attn, mask in zip(modules, saved):
            if mask is _UNSET:
                del attn.extra_mask
            else:
                attn.extra_mask = mask
