"""Two processes on localhost (jax.distributed over gloo) train like one process with the same global batch."""

import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT, metrics_rows, subprocess_env, tiny_lm_main_args

ARGS = tiny_lm_main_args(steps=3, checkpoint_every=3)


def _losses(workdir):
    return [r["loss"] for r in metrics_rows(workdir) if "loss" in r]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_match_one(tmp_path):
    env = subprocess_env(num_cpu_devices=1)
    main = [sys.executable, "-m", "effitrans.main"]
    subprocess.run([*main, f"--workdir={tmp_path / 'one'}", *ARGS], cwd=ROOT, env=env, check=True, capture_output=True)

    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                *main,
                f"--workdir={tmp_path / 'two'}",
                *ARGS,
                "--config.mesh.data=2",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, abs=1e-5)
