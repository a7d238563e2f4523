"""Reading trained models: attention probabilities, per-head statistics, and how much of the attention mass
each `kernels.masks` pattern keeps (docs/attention_maps.md). `python -m effitrans.analysis attention ...`."""

from effitrans.analysis.attention_maps import (
    PROBABILITY_FAMILIES,
    add_sums,
    attention_modules,
    attention_probs,
    attention_sums,
    head_statistics,
    layer_qk,
    probs_sums,
    support_mask,
)
from effitrans.analysis.mask_coverage import (
    candidate_masks,
    check_threshold,
    layer_masks,
    recommend,
    window_density,
    window_mask,
    window_of_density,
)

__all__ = [
    "PROBABILITY_FAMILIES",
    "add_sums",
    "attention_modules",
    "attention_probs",
    "attention_sums",
    "candidate_masks",
    "check_threshold",
    "head_statistics",
    "layer_masks",
    "layer_qk",
    "probs_sums",
    "recommend",
    "support_mask",
    "window_density",
    "window_mask",
    "window_of_density",
]
