"""effitrans.sweep: points from sweep files, refusals before any run, slurm emission, collected tables and
plots, and (slow) a 2x2 sweep killed with SIGKILL and resumed without re-running finished points."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from effitrans import sweep
from effitrans.schema import ConfigError
from effitrans.train import records
from tests.helpers import ROOT, checkpoint_steps, metrics_rows, subprocess_env

TINY = "configs/lm_tiny.py:" + ",".join(
    [
        "model.num_layers=1",
        "data.seq_len=32",
        "data.max_eval_batches=1",
        "train.batch_size=8",
        "train.steps=4",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.warmup_steps=1",
        "train.sample_tokens=0",
    ]
)
GRID = """
from effitrans import sweep

def get_sweep(arg=None):
    return sweep.product({"train.seed": [0, 1]}, {"train.learning_rate": [0.001, 0.003]})
"""


def _sweep_file(tmp_path, body: str, name="grid.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def test_product_zipped_and_names():
    points = sweep.product(sweep.zipped({"model.a": [1, 2], "train.b": ["x", "y"]}), {"model.c": [[2], [4]]})
    assert points == [
        {"model.a": 1, "train.b": "x", "model.c": [2]},
        {"model.a": 1, "train.b": "x", "model.c": [4]},
        {"model.a": 2, "train.b": "y", "model.c": [2]},
        {"model.a": 2, "train.b": "y", "model.c": [4]},
    ]
    assert sweep.point_names(points) == ["a=1,b=x,c=2", "a=1,b=x,c=4", "a=2,b=y,c=2", "a=2,b=y,c=4"]
    # only the keys that vary name a point; a short name shared by two keys is spelled out; odd characters go
    two = [{"model.x": 1, "train.x": 2, "k": "a b", "s": 0}, {"model.x": 3, "train.x": 4, "k": "a/c", "s": 0}]
    assert sweep.point_names(two) == ["model.x=1,train.x=2,k=a_b", "model.x=3,train.x=4,k=a_c"]
    with pytest.raises(ConfigError, match=r"sweep axis train.seed=\[\]: allowed a non-empty list"):
        sweep.product({"train.seed": []})
    with pytest.raises(ConfigError, match=r"lists of one non-zero length"):
        sweep.zipped({"a": [1, 2], "b": [3]})


def test_bad_sweep_files_are_refused_before_any_run(tmp_path):
    grid = sweep.load_sweep(_sweep_file(tmp_path, GRID))
    assert [p.name for p in grid] == [
        "seed=0,learning_rate=0.001",
        "seed=0,learning_rate=0.003",
        "seed=1,learning_rate=0.001",
        "seed=1,learning_rate=0.003",
    ]
    sweep.check_points(TINY, grid)
    unknown = [sweep.Point("p", {"train.learning_rat": 0.1})]
    with pytest.raises(ConfigError, match=r"sweep point p: train.learning_rat=0.1: train.learning_rat is not a key"):
        sweep.check_points(TINY, unknown)
    with pytest.raises(ConfigError, match=r"sweep point q: config.train.steps=0 is not allowed"):
        sweep.check_points(TINY, [sweep.Point("q", {"train.steps": 0})])
    empty = "from effitrans import sweep\ndef get_sweep(arg=None):\n    return sweep.product({'train.seed': [0]}, [])"
    with pytest.raises(ConfigError, match=r"get_sweep returned \[\]; allowed: a non-empty list of points"):
        sweep.load_sweep(_sweep_file(tmp_path, empty, "empty.py"))
    dup = (
        "from effitrans import sweep\ndef get_sweep(arg=None):\n    return [sweep.Point('a', {}), sweep.Point('a', {})]"
    )
    with pytest.raises(ConfigError, match=r"two points are named 'a'"):
        sweep.load_sweep(_sweep_file(tmp_path, dup, "dup.py"))
    with pytest.raises(ConfigError, match=r"no such file"):
        sweep.load_sweep(str(tmp_path / "missing.py"))


@pytest.mark.parametrize(
    "config, sweep_spec, names",
    [
        ("configs/lm_tiny.py", "configs/sweeps/seeds_long.py", ["seed=0", "seed=1"]),
        ("configs/moe_lm_tiny.py:model.moe.top_k=3", "configs/sweeps/seeds_long.py:steps=80,seeds=3", ["seed=3"]),
        ("configs/funnel_retrieval_small.py", "configs/sweeps/funnel_layer_stride.py:k=2,s=4", None),
        ("configs/listops_small.py", "configs/sweeps/lra_listops.py", None),
    ],
)
def test_shipped_sweep_files_fit_their_configs(config, sweep_spec, names):
    points = sweep.load_sweep(os.path.join(ROOT, sweep_spec))
    sweep.check_points(os.path.join(ROOT, config), points)
    assert names is None or [p.name for p in points] == names


def test_seeds_long_refuses_unknown_arguments():
    with pytest.raises(ConfigError, match=r"unknown sweep argument keys \['step'\]"):
        sweep.load_sweep(os.path.join(ROOT, "configs/sweeps/seeds_long.py:step=10"))


@pytest.mark.slow  # a subprocess importing JAX (the same refusals run in-process above)
def test_the_command_line_refuses_a_bad_sweep_with_exit_2_and_runs_nothing(tmp_path):
    bad = _sweep_file(tmp_path, "def get_sweep(arg=None):\n    return [{'train.stepz': 3}, {'train.stepz': 4}]")
    workdir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "effitrans.sweep", f"--config={TINY}", f"--sweep={bad}", f"--workdir={workdir}"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "effitrans.sweep: error: sweep point stepz=3: train.stepz=3: train.stepz is not a key" in proc.stderr
    assert not workdir.exists()


def test_emit_slurm_names_every_point_once_and_collect_tables_and_plot(tmp_path):
    points = sweep.load_sweep(_sweep_file(tmp_path, GRID))
    workdir = str(tmp_path / "sweep")
    sweep.write_points(workdir, TINY, "grid.py", points)
    script = open(sweep.emit_slurm(points, TINY, workdir)).read()
    assert "#SBATCH --array=0-3" in script
    for i, p in enumerate(points):
        assert script.count(f"--workdir={workdir}/{p.name} ") == 1 and f"  {i})  # {p.name}\n" in script
    # three points finished (as main leaves them), one not started
    for i, p in enumerate(points[:3]):
        run_dir = os.path.join(workdir, p.name)
        os.makedirs(run_dir)
        train = {"step": 4, "loss": 3.0 - i, "step_time_s": 0.1}
        records.write_json(
            os.path.join(run_dir, "result.json"), {"step": 4, "eval": {"eval_loss": 2.0 - i}, "train": train}
        )
    rows = sweep.collect(workdir)
    assert [r["point"] for r in rows] == [p.name for p in points]
    assert [r["status"] for r in rows] == ["done", "done", "done", "unfinished"]
    assert set(rows[0]) == {
        "point",
        "status",
        "train.seed",
        "train.learning_rate",
        "step",
        "loss",
        "step_time_s",
        "eval_loss",
    }
    assert rows[1]["train.learning_rate"] == 0.003 and rows[2]["eval_loss"] == 0.0 and rows[3]["loss"] is None
    md, csv_path, json_path = sweep.write_table(workdir, rows)
    assert open(md).read().count("\n") == 6 and open(csv_path).read().count("\n") == 5
    assert json.load(open(json_path)) == rows
    png = sweep.plot(workdir, rows, "eval_loss", "train.learning_rate")
    assert png.endswith("eval_loss_vs_train.learning_rate.png") and open(png, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="no finished point has both"):
        sweep.plot(workdir, rows, "eval_accuracy", "train.seed")


def _wait_for(check, timeout: float, proc) -> None:
    end = time.time() + timeout
    while not check():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < end, "timed out"
        time.sleep(0.2)


@pytest.mark.slow  # four tiny training runs in subprocesses, one of them twice
def test_a_2x2_sweep_killed_with_sigkill_resumes_without_rerunning_finished_points(tmp_path):
    grid = _sweep_file(tmp_path, GRID)
    workdir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "effitrans.sweep", f"--config={TINY}", f"--sweep={grid}", f"--workdir={workdir}"]
    points = sweep.load_sweep(grid)
    first, second = (str(workdir / p.name) for p in points[:2])
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        process_group=0,
    )
    try:
        _wait_for(lambda: os.path.isdir(os.path.join(second, "checkpoints")) and checkpoint_steps(second), 900, proc)
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its run, as a crashed machine would
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert records.read_result(first) is not None and records.read_result(second) is None
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{points[0].name}: finished before, skipped" in done.stdout
    starts = lambda d: [r for r in metrics_rows(d) if r.get("event") == "start"]
    assert len(starts(first)) == 1  # not run again
    resumed = [r["step"] for r in starts(second)]
    assert resumed[0] == 0 and resumed[1] in (2, 4) and len(resumed) == 2  # resumed from its checkpoint
    rows = json.loads((workdir / "results.json").read_text())
    assert len(rows) == 4 and all(r["status"] == "done" and r["step"] == 4 for r in rows)
    assert {"train.seed", "train.learning_rate", "loss", "eval_loss", "eval_bits_per_byte"} <= set(rows[0])
    assert (workdir / "eval_loss_vs_train.seed.png").exists() and (workdir / "results.md").exists()


def test_plot_draws_one_png_of_several_runs(tmp_path):
    from effitrans import plot

    for name, losses in (("a", [3.0, 2.0]), ("b", [3.5, 2.5, 1.5])):
        os.makedirs(tmp_path / "sw" / name)
        rows = [{"event": "start", "step": 0}] + [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
        rows.append({"step": 2, "loss": 9.0})  # a resumed run logs step 2 again: the later row counts
        (tmp_path / "sw" / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot.curve(str(tmp_path / "sw" / "b"), "loss") == ([1, 2, 3], [3.5, 9.0, 1.5])
    assert plot.run_dirs([str(tmp_path / "sw")]) == [str(tmp_path / "sw" / "a"), str(tmp_path / "sw" / "b")]
    out = plot.plot_curves([str(tmp_path / "sw" / "a"), str(tmp_path / "sw")], "loss", str(tmp_path / "loss.png"))
    assert open(out, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="--metric=eval_mrr: none of 3 run"):
        plot.plot_curves([str(tmp_path / "sw")] * 1 + [str(tmp_path / "sw" / "a")], "eval_mrr", str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="no metrics.jsonl in it"):
        plot.run_dirs([str(tmp_path)])
