"""Case 7: values that used to be accepted (and failed later, or silently) are refused when the config is
validated or the dataset constructed, before any model is built, naming the key, the value and what is
allowed."""

import os
import time

import ml_collections
import pytest

from effitrans.bench import train as bench_train
from effitrans.config_validation import validate_config
from effitrans.data import listops, text
from effitrans.data.registry import build_dataset
from effitrans.schema import ConfigError
from tests.helpers import ROOT, tiny_lm_experiment


def test_case7_vocab_size_below_the_tokenizer_is_refused():
    cfg = tiny_lm_experiment()
    cfg.model.vocab_size = 100  # byte ids reach 255, specials 260: used to train into NaN
    with pytest.raises(ConfigError, match=r"config\.model\.vocab_size=100 .*>= 261"):
        validate_config(cfg)
    cfg.model.vocab_size = 261
    validate_config(cfg)


@pytest.mark.parametrize("key,value", [("b1", 1.5), ("b1", -0.1), ("b1", 1.0), ("b2", 1.0), ("b2", float("nan"))])
def test_case7_adam_betas_outside_zero_one_are_refused(key, value):
    cfg = tiny_lm_experiment(**{key: value})
    with pytest.raises(ConfigError, match=rf"config\.train\.{key}={value!r} .*\[0, 1\)"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "key,value",
    [("learning_rate", float("inf")), ("weight_decay", float("nan")), ("min_lr_ratio", 1.5), ("grad_clip", 1e400)],
)
def test_case7_optimizer_numbers_must_be_finite_and_in_range(key, value):
    cfg = tiny_lm_experiment(**{key: value})
    with pytest.raises(ConfigError, match=rf"config\.train\.{key}="):
        validate_config(cfg)


def test_case7_eval_batch_size_must_divide_over_the_mesh():
    cfg = tiny_lm_experiment(batch_size=8)
    cfg.mesh.data = 2
    cfg.data.eval_batch_size = 3  # used to crash at the first evaluation, after training
    with pytest.raises(ConfigError, match=r"config\.data\.eval_batch_size=3 .*data x fsdp = 2"):
        validate_config(cfg, num_devices=8)
    cfg.data.eval_batch_size = None  # None: the training batch size, 8
    validate_config(cfg, num_devices=8)


def test_case7_attention_family_relations_are_checked_with_the_config():
    cfg = tiny_lm_experiment()  # 4 query heads, 2 kv heads
    cfg.model.attention.kind = "lsh"  # used to pass validation and fail when the model was built
    with pytest.raises(ConfigError, match=r"config\.model\.num_kv_heads=2 must equal .*'lsh'"):
        validate_config(cfg)
    cfg.model.num_kv_heads = 4
    cfg.model.attention.kind = "transient_global"
    cfg.data.seq_len = 40  # used to fail inside the first train step's trace
    with pytest.raises(ConfigError, match=r"config\.data\.seq_len=40 must be a multiple of .*global_block=16"):
        validate_config(cfg)
    cfg.data.seq_len = 48
    validate_config(cfg)


def test_case7_impossible_listops_lengths_are_refused_at_once():
    common = dict(seq_len=64, global_batch_size=2, seed=0)
    t0 = time.perf_counter()
    # Depth 2 with 2..3 arguments: trees of 1, 4 or 5 tokens only.
    with pytest.raises(ValueError, match=r"min_len=20, max_len=30.*max_depth=2, max_args=3.*longest .* 5"):
        listops.ListOpsDataset(min_len=20, max_len=30, max_depth=2, max_args=3, **common)
    # Two arguments per operator: lengths 1, 4, 7, 10, ... (a gap, not a bound).
    with pytest.raises(ValueError, match=r"min_len=5, max_len=6"):
        listops.ListOpsDataset(min_len=5, max_len=6, max_depth=6, max_args=2, **common)
    assert time.perf_counter() - t0 < 1.0  # used to take 100k sampling tries per example
    ds = listops.ListOpsDataset(min_len=7, max_len=7, max_depth=3, max_args=2, **common)
    assert (ds.get_batch(0)["inputs"][:, 1:8] != listops.PAD).all()  # a feasible exact length still samples
    assert listops.ListOpsDataset(**common | {"seq_len": 2048}).max_len == 2000  # the LRA defaults pass
    cfg = ml_collections.ConfigDict(dict(name="listops", seq_len=64, min_len=20, max_len=30, max_depth=2, max_args=3))
    with pytest.raises(ConfigError, match=r"config\.data\.min_len=20"):
        build_dataset(cfg, global_batch_size=2, seed=0)


def test_case7_a_corpus_of_binary_files_is_refused_naming_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("Plain text that is fine.\n" * 20)
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"image\.txt.* not UTF-8 text"):
        text.load_corpus(str(tmp_path))
    (tmp_path / "image.txt").write_bytes(b"\x00" * 512)  # valid UTF-8, but NUL bytes: binary
    with pytest.raises(ValueError, match=r"image\.txt.* binary"):
        text.load_corpus(str(tmp_path))
    cfg = ml_collections.ConfigDict(dict(name="text_lm", seq_len=16, corpus_path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"config\.data\.corpus_path=.*image\.txt"):
        build_dataset(cfg, global_batch_size=2, seed=0)


def test_case7_bench_train_refuses_zero_steps(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:  # used to time nothing and print a table of NaN with exit 0
        bench_train.main([f"--config={os.path.join('configs', 'lm_tiny.py')}", "--steps=0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--steps=0" in err and "positive integer" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--help"])
    assert e.value.code == 0 and "--steps" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"steps=0"):
        bench_train.run(tiny_lm_experiment(), steps=0)
