"""Crash safety: SIGKILL mid-run then the same command resumes and ends with the uninterrupted loss."""

import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, checkpoint_steps, metrics_rows, subprocess_env, tiny_lm_main_args

STEPS = 300
ARGS = tiny_lm_main_args(steps=STEPS, checkpoint_every=25, log_every=25)


def _cmd(workdir):
    return [sys.executable, "-m", "effitrans.main", f"--workdir={workdir}", *ARGS]


def _final_loss(workdir):
    return [r for r in metrics_rows(workdir) if r.get("step") == STEPS and "loss" in r][-1]["loss"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_then_rerun_resumes_with_identical_final_loss(tmp_path):
    env = subprocess_env()
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(_cmd(straight), cwd=ROOT, env=env, check=True, capture_output=True)

    proc = subprocess.Popen(_cmd(crashed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint_steps(crashed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_steps(crashed)
    assert killed_at and killed_at[-1] < STEPS, f"the run was not interrupted mid-way (checkpoints {killed_at})"

    rerun = subprocess.run(_cmd(crashed), cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    assert "resumed from checkpoint at step" in rerun.stdout
    assert _final_loss(crashed) == pytest.approx(_final_loss(straight), abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    env = subprocess_env()
    proc = subprocess.Popen(
        _cmd(tmp_path), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while not checkpoint_steps(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "signal 15 received: saved step" in out
    stopped_at = int(out.split("signal 15 received: saved step ")[1].split(",")[0])
    assert stopped_at < STEPS and checkpoint_steps(tmp_path)[-1] == stopped_at
