"""SIGKILL while a checkpoint is being written, again and again, never leaves a workdir that fails to resume;
a corrupt newest checkpoint is set aside and the run still reaches its final step with the uninterrupted loss."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, checkpoint_steps, metrics_rows, subprocess_env, tiny_lm_main_args, truncate_array_files

STEPS = 40
# A checkpoint every step: a write is under way almost all the time.
ARGS = tiny_lm_main_args(steps=STEPS, checkpoint_every=1, keep_checkpoints=2, log_every=10)


def _cmd(workdir):
    return [sys.executable, "-m", "effitrans.main", f"--workdir={workdir}", *ARGS]


def _final_loss(workdir):
    return [r for r in metrics_rows(workdir) if r.get("step") == STEPS and "loss" in r][-1]["loss"]


def _entries(workdir):
    d = os.path.join(workdir, "checkpoints")
    return os.listdir(d) if os.path.isdir(d) else []


def _kill_during_a_write(workdir, env, rng) -> list[str]:
    """Starts the run, lets it commit 1-6 more checkpoints, waits until the next write is in flight (orbax's
    temporary folder exists: the step is not committed), sleeps 0-20 ms more, SIGKILLs. Returns the folder
    names seen at the kill."""
    start = (checkpoint_steps(workdir) or [0])[-1]
    target = start + rng.randint(1, 6)
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    seen: list[str] = []
    while proc.poll() is None and time.time() < deadline:
        seen = _entries(workdir)
        if any("tmp" in n for n in seen) and max([int(n) for n in seen if n.isdigit()] or [0]) >= target:
            time.sleep(rng.uniform(0.0, 0.02))
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return seen


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkill_during_checkpoint_writes_then_corrupt_newest_still_reaches_final_step(tmp_path):
    env, rng = subprocess_env(), random.Random(0)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cmd(straight), cwd=ROOT, env=env, check=True, capture_output=True)

    mid_write = 0
    for _ in range(5):  # each rerun must resume from what the previous kill left, and is killed again
        seen = _kill_during_a_write(killed, env, rng)
        mid_write += any("tmp" in n for n in seen)
    assert mid_write >= 3, "the kills did not land during checkpoint writes"

    steps = checkpoint_steps(killed)
    assert steps and steps[-1] < STEPS, f"a kill should leave the run unfinished (checkpoints {steps})"
    truncate_array_files(os.path.join(killed, "checkpoints", str(steps[-1]), "state"))  # then a torn newest

    rerun = subprocess.run(_cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"checkpoint at step {steps[-1]} set aside (unreadable" in rerun.stdout
    assert f"finished at step {STEPS}" in rerun.stdout
    assert any(n.startswith(f"{steps[-1]}-unreadable-") for n in os.listdir(killed / "checkpoints.set_aside"))
    assert _final_loss(killed) == pytest.approx(_final_loss(straight), abs=1e-6)
