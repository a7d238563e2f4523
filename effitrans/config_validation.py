"""Validation of a whole effitrans config, once, before anything is built or compiled.

Defaults live only in configs/*.py; this module holds what is *allowed*: for every key, a check that
returns None when the value is fine or a phrase saying what is allowed. Unknown keys are errors too, so
a typo never silently falls back to a default. Every error names the key, the value and the allowed set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the key, the value and what is allowed."""


# ---- small value checks: each returns None if ok, else a description of what is allowed -------------


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def int_at_least(lo: int) -> Check:
    return lambda v: None if _is_int(v) and v >= lo else f"an int >= {lo}"


def float_at_least(lo: float, strict: bool = False) -> Check:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > lo if strict else v >= lo)
        return None if ok else f"a number {'>' if strict else '>='} {lo}"

    return check


def one_of(*allowed) -> Check:
    return lambda v: None if v in allowed else f"one of {list(allowed)}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else (None if check(v) is None else f"None or {check(v)}")


def boolean(v):
    return None if isinstance(v, bool) else "True or False"


def string(v):
    return None if isinstance(v, str) else "a string"


def anything(v):
    return None


def block_size(v):
    return None if v is None or (_is_int(v) and v > 0 and v % 8 == 0) else "None or a positive multiple of 8"


def int_or_int_list(v):
    if _is_int(v) and v >= 1:
        return None
    if isinstance(v, (list, tuple)) and v and all(_is_int(x) and x >= 1 for x in v):
        return None
    return "an int >= 1 or a non-empty list of ints >= 1"


def rules_table(v):
    try:
        ok = all(len(r) == 2 and isinstance(r[0], str) for r in v)
    except TypeError:
        ok = False
    return None if ok else "a sequence of (logical_axis, mesh_axis | tuple of mesh axes | None) pairs"


# ---- the schema ------------------------------------------------------------------------------------

ATTENTION_IMPLS = ("reference", "xla", "pallas", "auto")


def _funnel_schema():
    from effitrans.funnel.config import funnel_schema

    return funnel_schema()


def _model_schema():
    from effitrans.attention import ATTENTION_FAMILIES
    from effitrans.models.registry import MODELS
    from effitrans.models.transformer import DTYPES

    return {
        "name": one_of(*MODELS),
        "vocab_size": int_at_least(1),
        "d_model": int_at_least(1),
        "num_layers": int_at_least(1),
        "num_heads": int_at_least(1),
        "num_kv_heads": int_at_least(1),
        "head_dim": int_at_least(2),
        "ffn_width": int_or_int_list,
        "ffn_activation": one_of("silu", "gelu", "relu"),
        "tie_embeddings": boolean,
        "rope_base": optional(float_at_least(0.0, strict=True)),
        "rope_layout": one_of("half", "interleaved"),
        "norm_eps": float_at_least(0.0, strict=True),
        "dtype": one_of(*DTYPES),
        "pooling": one_of("cls", "mean"),
        "num_classes": int_at_least(2),
        "embed_dim": int_at_least(1),
        "attention": {
            "kind": one_of(*ATTENTION_FAMILIES),
            "impl": one_of(*ATTENTION_IMPLS),
            "block_q": block_size,
            "block_k": block_size,
        },
        "funnel": _funnel_schema(),  # funnel_* models only; keys: configs/funnel_common.py
        # model.attention may also hold the keys its family declares (AttentionFamily.options).
    }


TRAIN_SCHEMA = {
    "task": one_of("lm", "classification", "retrieval"),
    "steps": int_at_least(1),
    "batch_size": int_at_least(1),
    "grad_accum_steps": int_at_least(1),
    "learning_rate": float_at_least(0.0, strict=True),
    "warmup_steps": int_at_least(0),
    "min_lr_ratio": float_at_least(0.0),
    "weight_decay": float_at_least(0.0),
    "b1": float_at_least(0.0),
    "b2": float_at_least(0.0),
    "grad_clip": optional(float_at_least(0.0, strict=True)),
    "checkpoint_every": int_at_least(1),
    "keep_checkpoints": int_at_least(1),
    "eval_every": int_at_least(1),
    "log_every": int_at_least(1),
    "seed": int_at_least(0),
    "contrastive_temperature": float_at_least(0.0, strict=True),
    "sample_prompt": string,
    "sample_tokens": int_at_least(0),
}

MESH_SCHEMA = {
    "data": int_at_least(1),
    "fsdp": int_at_least(1),
    "tensor": int_at_least(1),
    "rules": rules_table,
}


def _walk(cfg: Mapping, schema: Mapping, prefix: str) -> None:
    for key in cfg.keys():
        path = f"{prefix}.{key}"
        if key not in schema:
            raise ConfigError(f"{path} is not a known config key; known keys of {prefix}: {sorted(schema)}")
        check, value = schema[key], cfg[key]
        if isinstance(check, Mapping):
            if not hasattr(value, "keys"):
                raise ConfigError(f"{path}={value!r} must be a group with keys {sorted(check)}")
            _walk(value, check, path)
            continue
        problem = check(value)
        if problem is not None:
            raise ConfigError(f"{path}={value!r} is not allowed: expected {problem}")


def _family_keys_schema(kind) -> dict:
    """Checks for every family's own attention keys (configs/common.py declares them all, None = default).

    The chosen kind's keys: None or a value its check allows. Any other family's key must stay None, so a
    key that the chosen kind would ignore (window_left with kind='dense') is an error, not a silent no-op.
    """
    from effitrans.attention import ATTENTION_FAMILIES

    schema = {}
    for other, family in ATTENTION_FAMILIES.items():
        if other == kind:
            continue
        for key in family.options:
            schema[key] = lambda v, other=other, key=key: (
                None
                if v is None
                else f"None: {key} is a key of kind={other!r}, not of kind={kind!r} (set kind={other!r} to use it)"
            )
    chosen = ATTENTION_FAMILIES.get(kind)
    if chosen is not None:
        schema.update({key: optional(check) for key, check in chosen.options.items()})
    return schema


def validate_model_config(model_cfg, prefix: str = "config.model") -> None:
    """Checks model keys and the relations between them (e.g. num_heads % num_kv_heads)."""
    schema = _model_schema()
    schema["attention"] = {**schema["attention"], **_family_keys_schema(model_cfg.attention.get("kind"))}
    _walk(model_cfg, schema, prefix)
    m = model_cfg
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"{prefix}.num_kv_heads={m.num_kv_heads} must divide {prefix}.num_heads={m.num_heads} "
            f"(allowed: {[d for d in range(1, m.num_heads + 1) if m.num_heads % d == 0]})"
        )
    if m.get("rope_base") is not None and m.head_dim % 2:
        raise ConfigError(f"{prefix}.head_dim={m.head_dim} must be even when RoPE is used (rope_base set)")
    if not _is_int(m.ffn_width) and len(m.ffn_width) != m.num_layers:
        raise ConfigError(
            f"{prefix}.ffn_width has {len(m.ffn_width)} entries but {prefix}.num_layers="
            f"{m.num_layers}; give one width per layer or a single int"
        )
    if m.name == "encoder_classifier" and "num_classes" not in m:
        raise ConfigError(f"{prefix}.num_classes is required when {prefix}.name='encoder_classifier'")
    if m.name == "encoder_embedding" and "embed_dim" not in m:
        raise ConfigError(f"{prefix}.embed_dim is required when {prefix}.name='encoder_embedding'")
    if m.name != "causal_lm" and "pooling" not in m:
        raise ConfigError(f"{prefix}.pooling is required for encoder models (one of 'cls', 'mean')")
    from effitrans.funnel.config import check_funnel_config

    check_funnel_config(m, prefix)


def validate_config(config, *, num_devices: int | None = None, num_processes: int = 1) -> None:
    """Validates all four groups of an experiment config and the relations across them."""
    for group in ("model", "data", "train", "mesh"):
        if group not in config:
            raise ConfigError(f"config.{group} is missing; every config has groups model, data, train, mesh")
    extra = sorted(set(config.keys()) - {"model", "data", "train", "mesh"})
    if extra:
        raise ConfigError(f"config.{extra[0]} is not a known config group; groups are model, data, train, mesh")
    validate_model_config(config.model)
    from effitrans.data.registry import resolve_config

    try:
        resolve_config(config.data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{e}") from None
    if "funnel" in config.model:  # pooling must leave >= 1 token at the data's sequence lengths
        from effitrans.funnel.config import check_funnel_config

        check_funnel_config(
            config.model,
            "config.model",
            [config.data[k] for k in ("seq_len", "query_len", "doc_len") if k in config.data],
        )
    _walk(config.train, TRAIN_SCHEMA, "config.train")
    _walk(config.mesh, MESH_SCHEMA, "config.mesh")

    t, mesh = config.train, config.mesh
    mesh_size = mesh.data * mesh.fsdp * mesh.tensor
    if num_devices is not None and mesh_size > num_devices:
        raise ConfigError(
            f"config.mesh data={mesh.data} x fsdp={mesh.fsdp} x tensor={mesh.tensor} = {mesh_size} "
            f"devices, but only {num_devices} are available (allowed: a product <= {num_devices})"
        )
    batch_parallel = mesh.data * mesh.fsdp
    micro = t.batch_size // t.grad_accum_steps
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} must be divisible by "
            f"config.train.grad_accum_steps={t.grad_accum_steps}"
        )
    if micro % batch_parallel:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} (micro-batch {micro} with grad_accum_steps="
            f"{t.grad_accum_steps}) must be divisible by the data-parallel size data x fsdp = "
            f"{batch_parallel}"
        )
    if t.batch_size % num_processes:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} must be divisible by the number of processes {num_processes}"
        )
    expected_task = {
        "causal_lm": "lm",
        "encoder_classifier": "classification",
        "encoder_embedding": "retrieval",
        "funnel_classifier": "classification",
        "funnel_embedding": "retrieval",
    }[config.model.name]
    if t.task != expected_task:
        raise ConfigError(
            f"config.train.task={t.task!r} does not fit config.model.name={config.model.name!r} "
            f"(allowed: {expected_task!r})"
        )
