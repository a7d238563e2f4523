"""Neuron pruning of GLU feed-forwards: importance criteria, keep-masks, masked and physically sliced
models, distillation recovery, and MatFormer nested widths; whole-expert pruning of mixture-of-experts
feed-forwards. See docs/pruning.md and docs/moe.md."""

from effitrans.pruning.experts import (
    EXPERT_CRITERIA,
    drop_experts,
    expert_importance,
    expert_statistics,
    keep_experts,
    moe_ffns,
)
from effitrans.pruning.importance import (
    ACTIVATION_CRITERIA,
    CRITERIA,
    activation_statistics,
    ffn_widths_of,
    masked_forward,
    neuron_importance,
    scores_from_statistics,
)
from effitrans.pruning.matformer import (
    evaluate_lm,
    extract,
    matformer_task,
    nested_widths,
    prefix_masks,
    train_matformer,
)
from effitrans.pruning.recovery import distill, distill_config, kd_loss, token_batches
from effitrans.pruning.slicing import (
    check_ratio,
    ffn_params,
    keep_masks,
    load_pruned,
    mask_model,
    num_params,
    save_pruned,
    slice_model,
)

__all__ = [
    "ACTIVATION_CRITERIA",
    "CRITERIA",
    "EXPERT_CRITERIA",
    "activation_statistics",
    "check_ratio",
    "distill",
    "distill_config",
    "drop_experts",
    "expert_importance",
    "expert_statistics",
    "evaluate_lm",
    "extract",
    "ffn_params",
    "ffn_widths_of",
    "keep_experts",
    "keep_masks",
    "kd_loss",
    "load_pruned",
    "mask_model",
    "masked_forward",
    "moe_ffns",
    "matformer_task",
    "nested_widths",
    "neuron_importance",
    "num_params",
    "prefix_masks",
    "save_pruned",
    "scores_from_statistics",
    "slice_model",
    "token_batches",
    "train_matformer",
]
