"""Validation of a whole effitrans config, once, before anything is built or compiled: each group against
the keys its part declares (effitrans.registry, data.registry, train.schema), then the relations across
groups. Every error names the key, the value and the allowed set.
"""

from __future__ import annotations

from flax import nnx

from effitrans import schema
from effitrans.attention import build_attention
from effitrans.attention.sparse_families import TRANSIENT_GLOBAL_KEYS
from effitrans.data.registry import resolve_config
from effitrans.data.tokenizer import VOCAB_SIZE
from effitrans.funnel.config import check_funnel_config
from effitrans.models.transformer import compute_dtype
from effitrans.registry import validate_model_config
from effitrans.schema import ConfigError, is_int, validate
from effitrans.train.schema import MESH_KEYS, TRAIN_KEYS


def check_attention_family(model_cfg) -> None:
    """The relations an attention family's builder requires (e.g. no GQA, keys it cannot do without), checked by
    building one attention module abstractly (shapes only, no arrays): the builder is where a family states
    them, so they are checked here without a second copy."""
    causal = model_cfg.name == "causal_lm"
    try:
        nnx.eval_shape(
            lambda: build_attention(model_cfg, causal=causal, rngs=nnx.Rngs(0), dtype=compute_dtype(model_cfg))
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_config(config, *, num_devices: int | None = None, num_processes: int = 1) -> None:
    """Validates all four groups of an experiment config and the relations across them."""
    for group in ("model", "data", "train", "mesh"):
        if group not in config:
            raise ConfigError(f"config.{group} is missing; every config has groups model, data, train, mesh")
    extra = sorted(set(config.keys()) - {"model", "data", "train", "mesh"})
    if extra:
        raise ConfigError(f"config.{extra[0]} is not a known config group; groups are model, data, train, mesh")
    validate_model_config(config.model)
    check_attention_family(config.model)
    try:
        data = resolve_config(config.data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{e}") from None
    if (
        data["name"] != "timeseries" and config.model.vocab_size < VOCAB_SIZE
    ):  # every dataset emits byte-tokenizer ids up to VOCAB_SIZE - 1
        raise ConfigError(
            f"config.model.vocab_size={config.model.vocab_size} is below the size of the tokenizer of "
            f"config.data.name={data['name']!r} (ids up to {VOCAB_SIZE - 1}); allowed: >= {VOCAB_SIZE}"
        )
    lengths = {k: data[k] for k in ("seq_len", "query_len", "doc_len") if is_int(data.get(k))}
    if config.model.attention.kind == "transient_global":  # global tokens summarise whole blocks of the input
        block = schema.value(config.model.attention, TRANSIENT_GLOBAL_KEYS, "global_block")
        for key, length in lengths.items():
            if length % block:
                raise ConfigError(
                    f"config.data.{key}={length} must be a multiple of config.model.attention.global_block={block}"
                )
    if "funnel" in config.model:  # pooling must leave >= 1 token at the data's sequence lengths
        check_funnel_config(config.model, "config.model", list(lengths.values()))
    validate(config.train, TRAIN_KEYS, "config.train")
    validate(config.mesh, MESH_KEYS, "config.mesh")

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
    eval_batch = data.get("eval_batch_size")
    if is_int(eval_batch) and eval_batch > 0 and (eval_batch % batch_parallel or eval_batch % num_processes):
        raise ConfigError(
            f"config.data.eval_batch_size={eval_batch} must be divisible by the data-parallel size data x fsdp = "
            f"{batch_parallel} and by the number of processes {num_processes} (None: config.train.batch_size)"
        )
    expected_task = {
        "causal_lm": "lm",
        "encoder_classifier": "classification",
        "encoder_embedding": "retrieval",
        "funnel_classifier": "classification",
        "funnel_embedding": "retrieval",
        "autoformer": "forecast",
        "dlinear": "forecast",
        "transformer_forecaster": "forecast",
        "ckcnn": "forecast",
        "cnn": "forecast",
        "ckcnn_classifier": "classification",
    }[config.model.name]
    if t.task != expected_task:
        raise ConfigError(
            f"config.train.task={t.task!r} does not fit config.model.name={config.model.name!r} "
            f"(allowed: {expected_task!r})"
        )
    if (data["name"] == "timeseries") != (t.task == "forecast"):
        raise ConfigError(
            f"config.train.task={t.task!r} does not fit config.data.name={data['name']!r} (the timeseries dataset "
            f"and the forecast task go together)"
        )
    if t.task == "forecast":
        check_forecast_shapes(config.model, data)


def check_forecast_shapes(model_cfg, data: dict) -> None:
    """A forecaster's lengths and channels (its model.<name> group) must be the dataset's (`data`: the resolved
    config.data)."""
    a = model_cfg[model_cfg.name]
    for key in ("input_len", "pred_len", "num_series"):  # the data's own range first, then the match
        if not is_int(data[key]) or data[key] < 1:
            raise ConfigError(f"config.data.{key}={data[key]!r} must be an int >= 1")
    channels = data["num_series"] if data["series"] == "synthetic" else 1  # the statsmodels series are univariate
    for key, have, want in (
        ("input_len", a.input_len, data["input_len"]),
        ("pred_len", a.pred_len, data["pred_len"]),
        ("num_series", a.num_series, channels),
    ):
        if have != want:
            raise ConfigError(
                f"config.model.{model_cfg.name}.{key}={have} does not match the data's {key}={want} "
                f"(config.data.name={data['name']!r}, series={data['series']!r}); allowed: {want}"
            )
