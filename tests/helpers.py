"""Small shared test utilities (not fixtures): tiny model configs built from the real config defaults."""

import json
import os

from effitrans import defaults
from effitrans.schema import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped_config(name: str):
    """get_config() of configs/<name>.py."""
    return load_config(os.path.join(ROOT, "configs", f"{name}.py"))


def tiny_model_config(**overrides):
    """A 2-layer model small enough for exact comparisons in milliseconds."""
    base = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, ffn_width=48, vocab_size=61)
    base.update(overrides)
    attention = base.pop("attention", None)
    cfg = defaults.model(**base)
    if attention:
        cfg.attention.update(attention)
    return cfg


def tiny_lm_experiment(**train_overrides):
    """configs/lm_tiny.py shrunk to a 1-layer model on 32-byte windows, for fast training tests."""
    cfg = shipped_config("lm_tiny")
    cfg.model.num_layers = 1
    cfg.model.d_model = 64
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.head_dim = 16
    cfg.model.ffn_width = 128
    cfg.data.seq_len = 32
    cfg.data.max_eval_batches = 2
    cfg.train.batch_size = 8
    cfg.train.steps = 6
    cfg.train.log_every = 1
    cfg.train.eval_every = 1000
    cfg.train.checkpoint_every = 2
    cfg.train.warmup_steps = 2
    cfg.train.sample_tokens = 0
    cfg.train.update(train_overrides)
    return cfg


def subprocess_env(num_cpu_devices: int = 1) -> dict:
    """Environment for a child python: the repo importable and `num_cpu_devices` fake CPU devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={num_cpu_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def tiny_lm_main_args(**train) -> list[str]:
    """`python -m effitrans.main` flags for lm_tiny shrunk to 1 layer on 32-byte windows (no sample, no eval
    before the end); `train` sets config.train keys."""
    train = {"log_every": 1, "eval_every": 1000, "sample_tokens": 0, "batch_size": 8, **train}
    return [
        "--config=configs/lm_tiny.py",
        "--config.data.seq_len=32",
        "--config.data.max_eval_batches=1",
        "--config.model.num_layers=1",
        *(f"--config.train.{k}={v}" for k, v in train.items()),
    ]


def metrics_rows(workdir) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(workdir) -> list[int]:
    """The committed checkpoint steps under WORKDIR/checkpoints (orbax's temporary folders left out)."""
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def truncate_array_files(step_dir) -> None:
    """Empties every array file of a checkpoint (what a full disk or a torn copy leaves)."""
    for root, _, files in os.walk(step_dir):
        for f in files:
            if not f.endswith((".json", "_METADATA", "_CHECKPOINT_METADATA")):
                open(os.path.join(root, f), "wb").close()
