"""The shipped forecasting config through the CLI: trains, evaluates and prints MSE / MAE."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env


@pytest.mark.slow  # a child process that compiles and trains: ~1 min on 2 cores
def test_autoformer_config_trains_and_reports_mse_and_mae(tmp_path):
    argv = ["--config=configs/autoformer_synthetic.py", f"--workdir={tmp_path}", "--config.train.steps=20"]
    command = [sys.executable, "-m", "effitrans.main", *argv]
    out = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    held_out = json.loads(out.stdout.split("held-out: ")[1].splitlines()[0])
    assert held_out["eval_examples"] == 400 - 24 + 1  # every window of the 400-point test split
    assert 0 < held_out["eval_mse"] < 1.5 and 0 < held_out["eval_mae"] < 1.2, held_out
