"""effitrans.schema: a group of Keys builds its ConfigDict of defaults (typed where the default is None),
validates a config naming the key path, and config files load by path without touching sys.path."""

import pytest

from effitrans import defaults, schema
from effitrans.data.registry import DATA_KEYS, build_dataset
from effitrans.schema import NOT_SET, ConfigError, Key, int_at_least, one_of, optional

GROUP = {
    "width": Key(8, int_at_least(1), "a width"),
    "limit": Key(None, optional(int_at_least(0)), "None: no limit", int),
    "sizes": Key([2, 4], schema.int_list, "one per block", object),
    "extra": Key(NOT_SET, int_at_least(1), "only some configs set it"),
    "inner": {"mode": Key("a", one_of("a", "b"), "a mode")},
}


def test_default_config_holds_every_declared_default_with_its_type():
    cfg = schema.default_config(GROUP, width=16)
    assert cfg.to_dict() == {"width": 16, "limit": None, "sizes": [2, 4], "inner": {"mode": "a"}}
    cfg.limit = 3  # a None default keeps its declared type: an int may be set, a string may not
    with pytest.raises(TypeError):
        cfg.limit = "three"
    cfg.sizes = 5  # field_type=object takes an int or a list
    assert schema.default_config(GROUP).sizes == [2, 4]  # every call builds a fresh group


def test_validate_names_the_key_path_the_value_and_what_is_allowed():
    cfg = schema.default_config(GROUP)
    schema.validate(cfg, GROUP, "config.g")
    cfg.inner.mode = "c"
    with pytest.raises(ConfigError, match=r"config\.g\.inner\.mode='c' is not allowed: expected one of \['a', 'b'\]"):
        schema.validate(cfg, GROUP, "config.g")
    cfg = schema.default_config(GROUP, wdth=3)
    with pytest.raises(ConfigError, match=r"config\.g\.wdth is not a known config key; known keys of config\.g"):
        schema.validate(cfg, GROUP, "config.g")


def test_value_falls_back_to_the_declared_default():
    assert schema.value({"limit": None, "width": 3}, GROUP, "width") == 3
    assert schema.value({}, GROUP, "width") == 8
    assert schema.value({"width": None}, GROUP, "width") == 8


def test_data_defaults_build_every_dataset():
    for name in ("copy", "associative_recall", "listops"):
        cfg = defaults.data(name)
        assert cfg.name == name and set(cfg.keys()) == {"name", *DATA_KEYS[name]}
        ds = build_dataset(cfg, global_batch_size=2, seed=0)
        assert ds.get_batch(0) is not None


def test_load_config_by_path_with_an_argument(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        "from effitrans import defaults\n\ndef get_config(arg=None):\n    return defaults.train(seed=int(arg))\n"
    )
    assert schema.load_config(f"{path}:7").seed == 7
    with pytest.raises(FileNotFoundError, match="missing.py"):
        schema.load_config(str(tmp_path / "missing.py"))
