"""`python -m effitrans.bench kvcache [--json PATH] [--plot PNG] [--context 32768] [--dtype bfloat16]`.

KV-cache bytes per token for named real configurations under each attention design, from the formulas,
next to the byte size of the cache arrays that effitrans actually allocates for a model with the same
attention dimensions (2 instantiated layers, scaled to the real layer count; the model itself is built
abstractly with nnx.eval_shape, so no weights are allocated, but the caches are real arrays).

Formulas (elements per token; times the element size, 2 bytes in bfloat16; l = layers):
    MHA  2 * n_h * d_h * l           GQA  2 * n_kv * d_h * l        MQA  2 * d_h * l
    MLA  (d_c + d_rope) * l          (DeepSeek-V2 Table 1; the cache holds [latent | rope key])
    sliding window (Gemma 3, 5 local : 1 global): global layers cache every token, local layers only the
    last `window`; bytes per token at a given context are shown as an average (formula only: a 5:1
    local/global layer mix is not one attention family; the ring buffer itself is sliding_window's WindowCache).

Every row carries its same-config MHA baseline and the compression ratio MHA / design. For configs that
are not MLA models, the MLA row is hypothetical, with DeepSeek-V2's proportions d_c = 4 d_h, d_rope = d_h / 2.
"""

from __future__ import annotations

import dataclasses

from effitrans import defaults
from effitrans.bench import common

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclasses.dataclass(frozen=True)
class RealConfig:
    """Attention dimensions of a published model (from its config.json / paper)."""

    layers: int
    heads: int  # n_h query heads
    head_dim: int  # d_h (DeepSeek: the no-RoPE per-head dim, qk_nope_head_dim)
    kv_heads: int  # n_kv of the model's own GQA (DeepSeek: MLA, see kv_lora_rank)
    kv_lora_rank: int | None = None  # d_c, for MLA models
    rope_dim: int | None = None  # d_rope (decoupled RoPE key), for MLA models
    gqa_groups: int | None = None  # the GQA group count to compare (default: kv_heads)
    window: int | None = None  # sliding window of local layers
    global_every: int | None = None  # one global layer every k layers (others local)
    note: str = ""


CONFIGS = {
    # DeepSeek-V3 (arXiv:2412.19437): 61 layers, 128 heads, d_h=128, d_c=512, d_rope=64; GQA with 16 groups
    # is the tutorial's comparison point.
    "deepseek-v3": RealConfig(61, 128, 128, 128, kv_lora_rank=512, rope_dim=64, gqa_groups=16, note="MLA model"),
    # Llama-3-70B: 80 layers, 64 heads, 8 kv heads, d_h=128.
    "llama-3-70b": RealConfig(80, 64, 128, 8, note="GQA model"),
    # SmolLM2-135M: 30 layers, 9 heads, 3 kv heads, d_h=64.
    "smollm2-135m": RealConfig(30, 9, 64, 3, note="GQA model"),
    # Gemma-3-4B: 34 layers, 8 heads, 4 kv heads, d_h=256, local window 1024, 5 local : 1 global.
    "gemma-3-4b": RealConfig(34, 8, 256, 4, window=1024, global_every=6, note="GQA + sliding window"),
}


def mla_dims(cfg: RealConfig) -> tuple[int, int, bool]:
    """(d_c, d_rope, hypothetical?)."""
    if cfg.kv_lora_rank is not None:
        return cfg.kv_lora_rank, cfg.rope_dim, False
    return 4 * cfg.head_dim, cfg.head_dim // 2, True


def formula_bytes_per_token(cfg: RealConfig, design: str, bytes_per: int, context: int = 0) -> int | float:
    """Bytes of KV cache per token for `design` in mha | gqa | mqa | mla | sliding_window."""
    l, h = cfg.layers, cfg.head_dim
    if design == "mha":
        return 2 * cfg.heads * h * l * bytes_per
    if design == "gqa":
        return 2 * (cfg.gqa_groups or cfg.kv_heads) * h * l * bytes_per
    if design == "mqa":
        return 2 * h * l * bytes_per
    if design == "mla":
        c, r, _ = mla_dims(cfg)
        return (c + r) * l * bytes_per
    if design == "sliding_window":
        n_global = l // cfg.global_every
        per_layer = 2 * cfg.kv_heads * h * bytes_per
        total = n_global * per_layer * context + (l - n_global) * per_layer * min(context, cfg.window)
        return total / context
    raise ValueError(f"design={design!r} is not one of ('mha', 'gqa', 'mqa', 'mla', 'sliding_window')")


def formula_text(cfg: RealConfig, design: str) -> str:
    if design == "mha":
        return f"2*{cfg.heads}*{cfg.head_dim}*{cfg.layers}"
    if design == "gqa":
        return f"2*{cfg.gqa_groups or cfg.kv_heads}*{cfg.head_dim}*{cfg.layers}"
    if design == "mqa":
        return f"2*{cfg.head_dim}*{cfg.layers}"
    if design == "mla":
        c, r, _ = mla_dims(cfg)
        return f"({c}+{r})*{cfg.layers}"
    n_global = cfg.layers // cfg.global_every
    return f"{n_global} global + {cfg.layers - n_global} local (window {cfg.window})"


def small_model_config(cfg: RealConfig, design: str, num_layers: int = 2):
    """A model config with `cfg`'s attention dimensions but 2 layers and a tiny width (never trained)."""
    kv_heads = {"mha": cfg.heads, "gqa": cfg.gqa_groups or cfg.kv_heads, "mqa": 1, "mla": cfg.heads}[design]
    m = defaults.model(
        d_model=64,
        num_layers=num_layers,
        num_heads=cfg.heads,
        num_kv_heads=kv_heads,
        head_dim=cfg.head_dim,
        ffn_width=16,
        vocab_size=16,
    )
    if design == "mla":
        c, r, _ = mla_dims(cfg)
        m.attention.kind = "latent"
        m.attention.kv_lora_rank = c
        m.attention.qk_rope_head_dim = r
    return m


def measured_bytes_per_token(cfg: RealConfig, design: str, dtype: str) -> int:
    """Bytes per token of the caches effitrans allocates (2 layers, scaled to cfg.layers): the byte size of
    a cache for 2 tokens minus that for 1 token, so per-row bookkeeping (lengths) cancels."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from effitrans.attention import cache_bytes  # pylint: disable=import-outside-toplevel
    from effitrans.registry import build_model  # pylint: disable=import-outside-toplevel

    model_cfg = small_model_config(cfg, design, num_layers=2)
    model = nnx.eval_shape(lambda: build_model(model_cfg))
    dt = getattr(jnp, dtype)
    per_token_2_layers = cache_bytes(model.init_cache(1, 2, dt)) - cache_bytes(model.init_cache(1, 1, dt))
    assert (per_token_2_layers * cfg.layers) % 2 == 0
    return per_token_2_layers * cfg.layers // 2


def rows_for(
    name: str, cfg: RealConfig, *, dtype: str = "bfloat16", context: int = 32768, measure: bool = True
) -> list[dict]:
    bytes_per = DTYPE_BYTES[dtype]
    designs = ["mha", "gqa", "mqa", "mla"] + (["sliding_window"] if cfg.window else [])
    mha = formula_bytes_per_token(cfg, "mha", bytes_per)
    rows = []
    for design in designs:
        fb = formula_bytes_per_token(cfg, design, bytes_per, context)
        row = {
            "config": name,
            "design": design,
            "formula": formula_text(cfg, design),
            "dtype": dtype,
            "bytes_per_token": fb,
            "measured_bytes_per_token": None,
            "measured_equals_formula": None,
            "baseline": "mha",
            "baseline_bytes_per_token": mha,
            "compression_x": mha / fb,
            "gib_at_context": fb * context / 2**30,
            "context": context,
        }
        if design == "mla":
            row["hypothetical"] = mla_dims(cfg)[2]
        if design == "gqa":
            row["kv_heads"] = cfg.gqa_groups or cfg.kv_heads
        if design == "sliding_window":
            row["note"] = "formula only: 5:1 local/global layer mix (ring buffer: sliding_window's WindowCache)"
        elif measure:
            mb = measured_bytes_per_token(cfg, design, dtype)
            row["measured_bytes_per_token"] = mb
            row["measured_equals_formula"] = mb == fb
        rows.append(row)
    return rows


COLUMNS = [
    ("config", "config"),
    ("design", "design"),
    ("formula", "formula (elements/token)"),
    ("bytes_per_token", "B/token"),
    ("measured_bytes_per_token", "measured B/token"),
    ("measured_equals_formula", "equal"),
    ("compression_x", "x vs MHA"),
    ("gib_at_context", "GiB @ context"),
]


def plot(rows: list[dict], path: str) -> None:
    """Grouped bars: bytes per token of each design, one group per config (log scale)."""

    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    configs = list(dict.fromkeys(r["config"] for r in rows))
    designs = list(dict.fromkeys(r["design"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(designs)
    for j, d in enumerate(designs):
        xs, ys = [], []
        for i, c in enumerate(configs):
            r = [r for r in rows if r["config"] == c and r["design"] == d]
            if r:
                xs.append(i + j * width)
                ys.append(r[0]["bytes_per_token"])
        ax.bar(xs, ys, width, label=d)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs)
    ax.set_yscale("log")
    ax.set_ylabel(f"KV-cache bytes per token ({rows[0]['dtype']})")
    ax.legend(ncol=len(designs), fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = common.bench_parser("kvcache", __doc__)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"from {list(CONFIGS)}")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--context", type=int, default=32768, help="tokens, for the GiB column and sliding window")
    parser.add_argument("--plot", default=None, help="write a PNG bar chart here")
    parser.add_argument("--no_measure", action="store_true", help="formulas only (skip instantiated caches)")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    for n in names:
        if n not in CONFIGS:
            parser.error(f"--configs: {n!r} is not one of {list(CONFIGS)}")
    rows = []
    for n in names:
        rows += rows_for(n, CONFIGS[n], dtype=args.dtype, context=args.context, measure=not args.no_measure)
    print(common.format_table(rows, COLUMNS))
    print(
        f"(bytes per token of KV cache, {args.dtype}; measured = arrays effitrans allocates; "
        f"GiB for one sequence of {args.context} tokens; hypothetical MLA rows use d_c = 4 d_h, d_rope = d_h/2)"
    )
    bad = [r for r in rows if r["measured_equals_formula"] is False]
    if bad:
        print(f"MISMATCH: measured != formula for {[(r['config'], r['design']) for r in bad]}")
    common.write_json(args.json, rows, dtype=args.dtype, context=args.context)
    if args.plot:
        plot(rows, args.plot)
    return 1 if bad else 0
