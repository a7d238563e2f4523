"""Small shared test utilities (not fixtures): tiny model configs built from the real config defaults."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "configs") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "configs"))

import common  # noqa: E402  (configs/common.py)


def tiny_model_config(**overrides):
    """A 2-layer model small enough for exact comparisons in milliseconds."""
    base = dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, ffn_width=48,
                vocab_size=61)
    base.update(overrides)
    attention = base.pop("attention", None)
    cfg = common.model(**base)
    if attention:
        cfg.attention.update(attention)
    return cfg
