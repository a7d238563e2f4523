"""Long Range Arena ListOps: listops_small with every attention family at equal steps (the CPU grid of
docs/results/lra_listops.md: sequences of 64-250 tokens padded to 256, a 2-layer d=64 encoder, 120 steps).

    python -m effitrans.sweep --config=configs/listops_small.py --sweep=configs/sweeps/lra_listops.py \
        --workdir=DIR --metric=eval_accuracy --key=model.attention.kind

Argument (`lra_listops.py:dense,lsh`): only those kinds. The per-kind attention keys scale with the
sequence length as in experiments/lra_listops.py (family_options); peak memory per kind is measured there.
"""

from effitrans import sweep

SEQ_LEN = 256
KINDS = ("dense", "sliding_window", "sparse_strided", "sparse_fixed", "lsh", "routing", "transient_global")

COMMON = {
    "data.seq_len": SEQ_LEN,
    "data.min_len": 64,
    "data.max_len": 250,
    "data.num_eval_examples": 256,
    "model.num_layers": 2,
    "model.d_model": 64,
    "model.num_heads": 4,
    "model.num_kv_heads": 4,
    "model.head_dim": 16,
    "model.ffn_width": 128,
    "train.batch_size": 16,
    "train.steps": 120,
    "train.learning_rate": 2e-3,
    "train.warmup_steps": 12,
    "train.log_every": 10,
    "train.eval_every": 120,
    "train.checkpoint_every": 120,
}


def family_options(kind: str, seq_len: int = SEQ_LEN) -> dict:
    """Per-kind attention keys, scaled with the sequence length (global tokens = CLS for the window)."""
    w = max(seq_len // 8, 16)
    return {
        "dense": {},
        "sliding_window": {"window_left": w, "window_right": w, "num_global": 1},
        "sparse_strided": {"stride": max(int(seq_len**0.5), 4)},
        "sparse_fixed": {"block": max(int(seq_len**0.5), 4), "summary": 2},
        "lsh": {"n_buckets": max(seq_len // 32, 2), "n_hashes": 2, "chunk_len": 32},
        "routing": {"num_clusters": max(int(seq_len**0.5) // 4, 2), "local_window": w // 2},
        "transient_global": {"local_radius": w // 2 - 1, "global_block": 16},
    }[kind]


def get_sweep(arg=None):
    kinds = arg.split(",") if arg else KINDS
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown attention kinds {unknown} in the sweep argument; allowed: {list(KINDS)}")
    return [
        sweep.Point(
            kind,
            {
                **COMMON,
                "model.attention.kind": kind,
                **{f"model.attention.{k}": v for k, v in family_options(kind).items()},
            },
        )
        for kind in kinds
    ]
