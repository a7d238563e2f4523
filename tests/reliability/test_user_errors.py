"""Case 6: every user error through `python -m effitrans.main` is one line on stderr,
`effitrans.main: error: ...` naming the key or flag, with exit code 2 and no traceback, raised before any
model is built; only bugs print a traceback (with a hint to report them), or `--debug` asks for one.

The table of bad inputs runs in this process by default (absl flags re-parsed per row, fast); the same
table through a fresh `python -m effitrans.main` per row is the slow test.
"""

import os
import re
import subprocess
import sys

import pytest
from absl import flags

from effitrans import main as entry
from effitrans.train import trainer as trainer_module
from tests.helpers import ROOT, subprocess_env

# One row per bad input: `id: extra arguments [=> what the message must name]` (an indented line continues
# the row); by default the message must name the last argument's config key and value. "{tmp}" is the test's
# tmp_path; the base command line is --config=configs/lm_tiny.py --workdir={tmp}/work unless a row gives its own.
TABLE_TEXT = """
# optimizer
b1: --config.train.b1=1.5
b2: --config.train.b2=1.0
infinite_learning_rate: --config.train.learning_rate=inf
min_lr_ratio_above_one: --config.train.min_lr_ratio=2.0
# the training loop
zero_steps: --config.train.steps=0
zero_log_every: --config.train.log_every=0
zero_batch: --config.train.batch_size=0
task_vs_model: --config.train.task=classification => config.train.task
# the model and the mesh
vocab_below_tokenizer: --config.model.vocab_size=100
kv_heads: --config.model.num_kv_heads=3
attention_kind: --config.model.attention.kind=bogus => config.model.attention.kind='bogus'
attention_without_gqa: --config.model.attention.kind=lsh => config.model.num_kv_heads=2
mesh_zero: --config.mesh.data=0
# model against data and mesh
global_block_vs_seq_len: --config.model.attention.kind=transient_global --config.model.num_kv_heads=4
    --config.data.seq_len=100
eval_batch_vs_mesh: --config.mesh.data=2 --config.data.eval_batch_size=3 => config.data.eval_batch_size
# data
seq_len: --config.data.seq_len=0
val_fraction: --config.data.val_fraction=1.5
corpus_missing: --config.data.corpus_path={tmp}/nope => config.data.corpus_path
corpus_binary: --config.data.corpus_path={tmp}/binary => blob.txt
empty_sample_prompt: --config.train.sample_prompt= => config.train.sample_prompt
# overrides and flags
unknown_key: --config.train.stepz=3 => --config.train.stepz=3
wrong_type: --config.train.steps=abc => --config.train.steps=abc
unknown_mode: --mode=serve => --mode
empty_prompt: --prompt= => --prompt
zero_cpu_devices: --cpu_devices=0 => --cpu_devices=0
# files and processes
process_id_out_of_range: --coordinator_address=localhost:1 --num_processes=2 --process_id=2 => --process_id=2
config_missing: --config={tmp}/missing.py => missing.py
config_syntax_error: --config={tmp}/syntax.py => syntax.py
config_raises: --config={tmp}/raises.py => raises.py
# the workdir
workdir_is_a_file: --workdir={tmp}/file => --workdir
workdir_not_writable: --workdir=/proc/self/work => --workdir
# eval and generate need a trained run (case 5: they used random weights)
eval_without_checkpoint: --mode=eval => --mode=eval
generate_on_mistyped_workdir: --mode=generate --workdir={tmp}/typo => typo has no checkpoints
start_fresh_outside_training: --mode=eval --on_config_change=start_fresh => --on_config_change=start_fresh
"""


def parse_table(text: str) -> list[tuple[str, list[str], str]]:
    rows = []
    for line in re.sub(r"\n +", " ", text).splitlines():
        if line and not line.startswith("#"):
            row_id, rest = line.split(": ", 1)
            args, _, expected = rest.partition(" => ")
            rows.append((row_id, args.split(), expected or args.split()[-1].removeprefix("--")))
    return rows


TABLE = parse_table(TABLE_TEXT)
SUBPROCESS_ONLY = {"eval_batch_vs_mesh": ["--cpu_devices=2"]}  # in-process the test run has 8 devices


@pytest.fixture
def inputs(tmp_path):
    """The files the table refers to: a corpus of binary files, broken config files, a file as workdir."""
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "blob.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "binary" / "other.txt").write_bytes(b"\xff\xfe\x00\x01" * 512)
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "file").write_text("not a directory")
    return tmp_path


def command_line(extra, tmp) -> list[str]:
    args = [a.format(tmp=tmp) for a in extra]
    base = {"--config": "--config=configs/lm_tiny.py", "--workdir": f"--workdir={tmp}/work"}
    given = {a.split("=", 1)[0] for a in args}
    return [v for k, v in base.items() if k not in given] + args


def run_in_process(argv, capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of effitrans.main on `argv`, with flags re-parsed from scratch."""
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # override flags of the last parse
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    argv = ["effitrans.main", *argv]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
    capsys.readouterr()
    try:
        entry.main(entry.parse_flags(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def check_one_line(code, err, expected):
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("effitrans.main: error: ")]
    assert code == 2 and len(errors) == 1, (code, err)
    assert expected in errors[0], err


@pytest.fixture
def no_model(monkeypatch):
    """Fails the row if the Trainer gets as far as building a model."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was refused")

    monkeypatch.setattr(trainer_module, "build_model", built)


def test_case6_user_errors_are_one_line_exit_2_in_process(inputs, capsys, monkeypatch, no_model):
    for row_id, extra, expected in TABLE:
        code, err = run_in_process(command_line(extra, inputs), capsys, monkeypatch)
        try:
            check_one_line(code, err, expected)
        except AssertionError as e:
            raise AssertionError(f"row {row_id}: {e}") from None
    assert not (inputs / "work").exists()  # nothing was written for a refused run


def test_case6_debug_shows_the_traceback_of_a_user_error(inputs, capsys, monkeypatch, no_model):
    code, err = run_in_process(command_line(["--config.train.b1=1.5", "--debug"], inputs), capsys, monkeypatch)
    assert code == 2 and "Traceback" in err and "effitrans.main: error: " in err


def test_case6_every_user_error_class_raised_in_a_run_is_one_line(inputs, capsys, monkeypatch):
    for cls in entry.user_errors():  # e.g. a checkpoint of another config, a NaN loss: raised once running

        def failing(*args, cls=cls, **kwargs):
            raise cls(f"config.train.steps=3 refused by {cls.__name__}")

        monkeypatch.setattr(trainer_module, "Trainer", failing)
        code, err = run_in_process(command_line([], inputs), capsys, monkeypatch)
        check_one_line(code, err, f"config.train.steps=3 refused by {cls.__name__}")


def test_case6_a_bug_prints_its_traceback_and_how_to_report_it(inputs, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an internal failure")

    monkeypatch.setattr(trainer_module, "Trainer", broken)
    code, err = run_in_process(command_line([], inputs), capsys, monkeypatch)
    assert code == 1 and "Traceback" in err and "RuntimeError: an internal failure" in err
    assert "bug" in err.splitlines()[-1]


@pytest.mark.slow  # a process per row (JAX import each): about a minute on 2 cores
@pytest.mark.parametrize("row_id,extra,expected", TABLE, ids=[row[0] for row in TABLE])
def test_case6_user_errors_are_one_line_exit_2_subprocess(inputs, row_id, extra, expected):
    argv = command_line(extra + SUBPROCESS_ONLY.get(row_id, []), inputs)
    out = subprocess.run(
        [sys.executable, "-m", "effitrans.main", *argv],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    check_one_line(out.returncode, out.stderr, expected)
    assert not os.path.exists(inputs / "work")
