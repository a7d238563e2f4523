"""Benchmarks take the config as effitrans.main does: --config=FILE[:key=value,...] and --config.x=value."""

import pytest

from effitrans.bench import common


def test_config_flags_are_parsed_out_of_a_benchmarks_argv(capsys):
    argv = ["--config", "configs/lm_tiny.py:train.seed=2", "--requests", "3", "--config.model.num_layers=1"]
    cfg, spec, rest = common.config_from_args(argv, "configs/lm_small.py", "effitrans.bench x")
    assert spec == "configs/lm_tiny.py:train.seed=2" and rest == ["--requests", "3"]
    assert cfg.model.num_layers == 1 and cfg.train.seed == 2 and cfg.model.d_model == 128
    cfg, spec, _ = common.config_from_args(["--config.train.steps=5"], "configs/lm_small.py", "effitrans.bench x")
    assert spec == "configs/lm_small.py" and cfg.train.steps == 5
    for bad, named in (("--config.train.stepz=5", "config.train.stepz"), ("--config.train.steps=x", "x")):
        with pytest.raises(SystemExit) as e:
            common.config_from_args([bad], "configs/lm_tiny.py", "effitrans.bench x")
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("effitrans.bench x: error: ") and named in err and err.count("\n") == 1
