"""The keys of `config.train` and `config.mesh`: default, check and meaning of each."""

from __future__ import annotations

from effitrans.schema import (
    Key,
    float_at_least,
    float_in,
    int_at_least,
    non_empty_string,
    one_of,
    optional,
    rules_table,
)


def parse_step_range(v: str) -> tuple[int, int] | None:
    """(start, end) of a "START:END" step range (0 <= START < END), None for ""; ValueError otherwise."""
    if v == "":
        return None
    parts = v.split(":") if isinstance(v, str) else []
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
        raise ValueError(f'{v!r} is not a step range: expected "START:END" with 0 <= START < END, or ""')
    return int(parts[0]), int(parts[1])


def step_range(v) -> str | None:
    """The check of train.profile_steps."""
    try:
        parse_step_range(v)
    except ValueError:
        return '"" or "START:END" with 0 <= START < END (e.g. "10:13")'
    return None


TRAIN_KEYS = {
    "task": Key("lm", one_of("lm", "classification", "retrieval", "forecast"), "must fit model.name"),
    "steps": Key(300, int_at_least(1), "optimizer updates"),
    "batch_size": Key(16, int_at_least(1), "global batch (all processes, all micro-batches)"),
    "grad_accum_steps": Key(1, int_at_least(1), "micro-batches per update; batch_size must divide evenly"),
    "learning_rate": Key(3e-3, float_at_least(0.0, strict=True), "peak learning rate"),
    "warmup_steps": Key(30, int_at_least(0), "linear warmup from 0"),
    "min_lr_ratio": Key(0.1, float_in(0.0, 1.0, hi_open=False), "cosine decays to learning_rate * min_lr_ratio"),
    "weight_decay": Key(0.1, float_at_least(0.0), "AdamW decoupled decay on matrices only"),
    "b1": Key(0.9, float_in(0.0, 1.0), "Adam first-moment decay"),
    "b2": Key(0.95, float_in(0.0, 1.0), "Adam second-moment decay"),
    "grad_clip": Key(1.0, optional(float_at_least(0.0, strict=True)), "global-norm clip; None disables", float),
    "checkpoint_every": Key(100, int_at_least(1), "save every N steps (and at the end, and on SIGTERM/SIGINT)"),
    "keep_checkpoints": Key(3, int_at_least(1), "keep the newest K"),
    "eval_every": Key(100, int_at_least(1), "held-out evaluation every N steps (and at the end)"),
    "log_every": Key(10, int_at_least(1), "progress line + metrics.jsonl row every N steps"),
    "seed": Key(0, int_at_least(0), "params init and data order: batches are a pure function of (seed, step)"),
    "contrastive_temperature": Key(0.05, float_at_least(0.0, strict=True), "retrieval: InfoNCE temperature"),
    "sample_prompt": Key("The Python ", non_empty_string, "lm: prompt for the sample printed after training"),
    "sample_tokens": Key(120, int_at_least(0), "lm: how many bytes to generate for that sample"),
    "profile_steps": Key(
        "", step_range, 'jax.profiler trace of steps START..END-1 into WORKDIR/profile, e.g. "10:13"; "" for none'
    ),
}

# Logical axis -> mesh axes (t5x-style). Dimensions a mesh axis does not divide are replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", None),
)

MESH_KEYS = {
    "data": Key(1, int_at_least(1), "data-parallel replicas"),
    "fsdp": Key(1, int_at_least(1), "fully-sharded data parallel (params split over 'embed')"),
    "tensor": Key(1, int_at_least(1), "tensor parallel (heads, mlp, vocab)"),
    "rules": Key(DEFAULT_RULES, rules_table, "logical axis -> mesh axis, tuple of mesh axes, or None"),
}
