"""Every family's own keys are in every config's model.attention (effitrans.defaults), settable from the
command line, and only for the kind that reads them (a key the chosen kind would ignore is an error, not a
silent no-op)."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from effitrans.attention import ATTENTION_FAMILIES, build_attention
from effitrans.registry import validate_model_config
from effitrans.schema import ConfigError
from tests.helpers import ROOT, tiny_model_config


def test_declared_keys_are_exactly_the_families_options():
    declared = set(tiny_model_config().attention.keys()) - {"kind", "impl", "block_q", "block_k"}
    owners = {}
    for kind, family in ATTENTION_FAMILIES.items():
        for key in family.options:
            assert key not in owners, f"{key} is declared by both {owners.get(key)!r} and {kind!r}"
            owners[key] = kind
    assert declared == set(owners)
    assert all(tiny_model_config().attention[k] is None for k in declared)  # None = the family's default


def test_key_of_another_family_is_rejected_with_its_owner():
    cfg = tiny_model_config(attention=dict(kind="dense", window_left=8))
    with pytest.raises(
        ConfigError,
        match=r"config\.model\.attention\.window_left=8 is not allowed: expected "
        r"None: window_left is a key of kind='sliding_window', not of "
        r"kind='dense'",
    ):
        validate_model_config(cfg)


def test_chosen_family_key_is_checked():
    cfg = tiny_model_config(num_kv_heads=4, attention=dict(kind="lsh", n_buckets=3))
    with pytest.raises(
        ConfigError,
        match=r"config\.model\.attention\.n_buckets=3 is not allowed: expected None "
        r"or 1 or an even int >= 2",
    ):
        validate_model_config(cfg)


def test_family_keys_override_from_the_command_line(monkeypatch):
    argv = [
        "prog",
        f"--config={os.path.join(ROOT, 'configs', 'lm_tiny.py')}",
        "--config.model.attention.kind=sliding_window",
        "--config.model.attention.window_left=8",
        "--config.model.attention.num_global=2",
    ]
    monkeypatch.setattr("sys.argv", argv)  # config_flags finds the override keys by reading sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv)
    fv(argv)
    model_cfg = fv.config.model
    validate_model_config(model_cfg)
    import jax.numpy as jnp
    from flax import nnx

    attn = build_attention(model_cfg, causal=True, rngs=nnx.Rngs(0), dtype=jnp.float32)
    assert (attn.window_left, attn.window_right, attn.num_global) == (8, 0, 2)
