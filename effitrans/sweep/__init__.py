"""Sweeps: `python -m effitrans.sweep --config=configs/X.py --sweep=configs/sweeps/Y.py --workdir=DIR`.

A sweep file defines `get_sweep(arg=None)` returning a list of points: dicts of config overrides
({"model.funnel.strides": [4], "train.seed": 1}), usually built with `product` and `zipped`, or `Point`s
when a point needs a name of its own. Dict points are named after the keys whose values differ between
points ("strides=4,seed=1"). Every point is an ordinary `effitrans.main` run in DIR/<point> (its log in
DIR/<point>/log.txt), so a point resumes from its checkpoints after a crash and a finished point (one with
a result.json) is skipped when the sweep is run again. Points run one after another, or --parallel=N at a
time; --dry_run prints the commands. Before anything runs, every point's config is built and validated: an
unknown key, an empty sweep or two points of one name are refused (exit 2).

At the end (or with --collect, e.g. after --emit=slurm wrote DIR/sweep.slurm, an array job of one point
per task) the points' final metrics and override values go to DIR/results.{md,csv,json}, and
DIR/<metric>_vs_<key>.png plots --metric against --key (one line per value of the other keys).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from absl import logging

from effitrans.schema import ConfigError, load_config, set_key
from effitrans.train import records

POINTS_FILE = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Point:
    """One sweep point: its name (DIR/<name>) and its config overrides {dotted key: value}."""

    name: str
    overrides: dict


# ---- building points in sweep files ------------------------------------------------------------------


def _axis(axis) -> list[dict]:
    """A list of override dicts from an axis: a list of dicts as it is, or {key: [values]} (one key: its values;
    several keys: their product)."""
    if isinstance(axis, dict):
        for key, values in axis.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"sweep axis {key}={values!r}: allowed a non-empty list of values")
        keys = list(axis)
        return [dict(zip(keys, combo)) for combo in itertools.product(*axis.values())]
    if isinstance(axis, (list, tuple)) and all(isinstance(d, dict) for d in axis):
        return [dict(d) for d in axis]
    raise ConfigError(f"sweep axis {axis!r}: allowed {{key: [values]}} or a list of override dicts")


def product(*axes) -> list[dict]:
    """Every combination of the axes' values: product({"a": [1, 2]}, {"b": [3, 4]}) -> 4 override dicts. An axis
    is {key: [values]} or a list of override dicts (e.g. from `zipped`)."""
    out = [{}]
    for axis in axes:
        out = [{**left, **right} for left in out for right in _axis(axis)]
    return out


def zipped(axis: dict) -> list[dict]:
    """The i-th values of every key together: zipped({"a": [1, 2], "b": [3, 4]}) -> [{a: 1, b: 3}, {a: 2, b: 4}]."""
    lengths = {k: len(v) if isinstance(v, (list, tuple)) else None for k, v in axis.items()}
    if not axis or None in lengths.values() or len(set(lengths.values())) != 1:
        raise ConfigError(f"zipped({axis!r}): allowed {{key: [values]}} with lists of one non-zero length")
    keys = list(axis)
    return [dict(zip(keys, combo)) for combo in zip(*axis.values())]


def _value_text(v) -> str:
    if isinstance(v, (list, tuple)):
        return "-".join(_value_text(x) for x in v)
    return str(v)


def point_names(overrides: list[dict]) -> list[str]:
    """Names of override dicts: key=value of the keys whose values differ between them (the last part of the
    dotted key where that is unambiguous), joined by commas; characters other than [A-Za-z0-9._=,+-] become _."""
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    varying = [k for k in keys if len({json.dumps(o.get(k), default=str) for o in overrides}) > 1] or keys
    short = {k: k.rsplit(".", 1)[-1] for k in varying}
    label = {k: short[k] if list(short.values()).count(short[k]) == 1 else k for k in varying}
    names = [",".join(f"{label[k]}={_value_text(o[k])}" for k in varying if k in o) for o in overrides]
    return [re.sub(r"[^A-Za-z0-9._=,+-]", "_", n) for n in names]


# ---- loading and checking a sweep --------------------------------------------------------------------


def load_sweep(spec: str) -> list[Point]:
    """The points of the sweep file `spec` (path.py or path.py:arg): get_sweep(arg) with dicts named by
    point_names. Refuses (ConfigError) an empty sweep, a point that is neither a dict nor a Point, and two
    points of one name."""
    path, arg = spec.rsplit(":", 1) if ":" in os.path.basename(spec) else (spec, None)
    if not os.path.isfile(path):
        raise ConfigError(f"--sweep={spec}: no such file (allowed: a configs/sweeps/*.py file defining get_sweep)")
    module = _load_module(path)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(f"--sweep={spec}: the file defines no get_sweep(arg=None)")
    try:
        items = module.get_sweep() if arg is None else module.get_sweep(arg)
    except ConfigError:
        raise
    except ValueError as e:  # a sweep file refusing its argument
        raise ConfigError(f"--sweep={spec}: {e}") from e
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError(f"--sweep={spec}: get_sweep returned {items!r}; allowed: a non-empty list of points")
    dicts = [i for i in items if isinstance(i, dict)]
    names = iter(point_names(dicts))
    points = []
    for item in items:
        if isinstance(item, Point):
            points.append(item)
        elif isinstance(item, dict):
            points.append(Point(next(names), item))
        else:
            raise ConfigError(f"--sweep={spec}: point {item!r} is neither a dict of overrides nor a sweep.Point")
    seen: dict[str, Point] = {}
    for p in points:
        if not p.name or p.name in (".", "..") or "/" in p.name:
            raise ConfigError(f"--sweep={spec}: point name {p.name!r} is not a directory name")
        if p.name in seen:
            raise ConfigError(
                f"--sweep={spec}: two points are named {p.name!r} ({seen[p.name].overrides} and {p.overrides}); "
                "names must be unique (give the points distinct values or a sweep.Point name)"
            )
        seen[p.name] = p
    return points


def _load_module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"effitrans_sweep_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_points(config_spec: str, points: list[Point]) -> None:
    """Builds and validates every point's config (the --config file with the point's overrides): the first
    unknown key or disallowed value raises ConfigError naming the point and the key."""
    from effitrans.config_validation import validate_config

    base = load_config(config_spec)
    for p in points:
        cfg = copy.deepcopy(base)
        for key, value in p.overrides.items():
            set_key(cfg, key, value, f"sweep point {p.name}: {key}={value!r}")
        try:
            validate_config(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep point {p.name}: {e}") from None


def _flag_value(v) -> str:
    return v if isinstance(v, str) else repr(v)


def command(point: Point, config_spec: str, workdir: str, python: str = sys.executable) -> list[str]:
    """The `effitrans.main` command line of one point, run in DIR/<point>."""
    overrides = [f"--config.{k}={_flag_value(v)}" for k, v in point.overrides.items()]
    run_dir = os.path.join(workdir, point.name)
    return [python, "-m", "effitrans.main", f"--config={config_spec}", f"--workdir={run_dir}", *overrides]


def write_points(workdir: str, config_spec: str, sweep_spec: str, points: list[Point]) -> None:
    """DIR/sweep.json: the config, the sweep file and each point's overrides (what --collect reads)."""
    os.makedirs(workdir, exist_ok=True)
    records.write_json(
        os.path.join(workdir, POINTS_FILE),
        {
            "config": config_spec,
            "sweep": sweep_spec,
            "points": [{"name": p.name, "overrides": p.overrides} for p in points],
        },
    )


def read_points(workdir: str) -> list[Point]:
    path = os.path.join(workdir, POINTS_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"--workdir={workdir} has no {POINTS_FILE}: run or --emit a sweep into it first")
    with open(path) as f:
        return [Point(p["name"], p["overrides"]) for p in json.load(f)["points"]]


# ---- running -------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the sweep process dies (Linux), so a killed sweep leaves no
    orphan runs; main saves a checkpoint on SIGTERM."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_points(points: list[Point], config_spec: str, workdir: str, *, parallel: int = 1, log=logging.info) -> dict:
    """Runs every unfinished point (at most `parallel` at a time); returns {name: "done" | "skipped" |
    "failed (exit N)"}. A finished point (DIR/<point>/result.json) is skipped; an unfinished one resumes."""
    status: dict[str, str] = {}
    queue = []
    for p in points:
        if records.read_result(os.path.join(workdir, p.name)) is not None:
            status[p.name] = "skipped"
            log(f"{p.name}: finished before, skipped")
        else:
            queue.append(p)
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                p = queue.pop(0)
                run_dir = os.path.join(workdir, p.name)
                os.makedirs(run_dir, exist_ok=True)
                out = open(os.path.join(run_dir, "log.txt"), "a")
                cmd = command(p, config_spec, workdir)
                log(f"{p.name}: started ({shlex.join(cmd[1:])})")
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
                running[p.name] = (proc, out, time.perf_counter())
            time.sleep(0.2)
            for name, (proc, out, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                out.close()
                del running[name]
                finished = rc == 0 and records.read_result(os.path.join(workdir, name)) is not None
                status[name] = "done" if finished else f"failed (exit {rc})"
                log(f"{name}: {status[name]} in {time.perf_counter() - t0:.0f} s (log: {workdir}/{name}/log.txt)")
    finally:
        for proc, out, _ in running.values():  # interrupted: let each run save its checkpoint and stop
            proc.terminate()
            proc.wait()
            out.close()
    return status


# ---- collecting ------------------------------------------------------------------------------------


def _last_train_row(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    row: dict = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "loss" in r and "event" not in r:
                    row = r
    return row


def collect(workdir: str, points: list[Point] | None = None) -> list[dict]:
    """One row per point: point, status (done | unfinished), each override key's value, the final training
    loss and step time, and the held-out metrics of DIR/<point>/result.json."""
    points = read_points(workdir) if points is None else points
    rows = []
    for p in points:
        run_dir = os.path.join(workdir, p.name)
        result = records.read_result(run_dir)
        train = (result or {}).get("train") or _last_train_row(run_dir)
        row = {"point": p.name, "status": "done" if result is not None else "unfinished"}
        row.update({k: v for k, v in p.overrides.items()})
        row.update({k: train.get(k) for k in ("step", "loss", "step_time_s")})
        row.update((result or {}).get("eval") or {})
        rows.append(row)
    return rows


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    return "" if v is None else (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))


def write_table(workdir: str, rows: list[dict]) -> list[str]:
    """DIR/results.md, .csv and .json of the collected rows; returns the three paths."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    paths = [os.path.join(workdir, f"results.{ext}") for ext in ("md", "csv", "json")]
    with open(paths[0], "w") as f:
        f.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
        for r in rows:
            f.write("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_cell(r.get(c)) for c in columns] for r in rows])
    records.write_json(paths[2], rows)
    return paths


def plot(workdir: str, rows: list[dict], metric: str, key: str) -> str:
    """DIR/<metric>_vs_<key>.png: `metric` of the finished points against `key`, one line per value of the
    other override keys. ValueError when no finished point has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get(metric) is not None and key in r and r["status"] == "done"]
    if not done:
        known = sorted({k for r in rows for k in r})
        raise ValueError(f"--metric={metric} --key={key}: no finished point has both; columns: {known}")
    others = [  # the other override keys that vary: one line per combination of their values
        k
        for k in dict.fromkeys(k for r in rows for k in r)
        if "." in k and k != key and len({_cell(r.get(k)) for r in rows}) > 1
    ]
    numeric = all(isinstance(r[key], (int, float)) and not isinstance(r[key], bool) for r in done)
    xs = sorted({_cell(r[key]) for r in done}) if not numeric else None
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict]] = {}
    for r in done:
        groups.setdefault(", ".join(f"{k.rsplit('.', 1)[-1]}={_cell(r.get(k))}" for k in others), []).append(r)
    for label, group in groups.items():
        group = sorted(group, key=lambda r: r[key] if numeric else xs.index(_cell(r[key])))
        x = [r[key] if numeric else xs.index(_cell(r[key])) for r in group]
        ax.plot(x, [r[metric] for r in group], marker="o", label=label or None)
    if not numeric:
        ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    if any(groups):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, f"{metric}_vs_{key}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def emit_slurm(points: list[Point], config_spec: str, workdir: str, python: str = "python") -> str:
    """DIR/sweep.slurm: an sbatch array job of one point per task (a finished point exits at once); returns
    its path. Submit with `sbatch DIR/sweep.slurm`, then `--collect`."""
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=effitrans-sweep",
        f"#SBATCH --array=0-{len(points) - 1}",
        f"#SBATCH --output={os.path.abspath(workdir)}/slurm-%A_%a.log",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, p in enumerate(points):
        result = shlex.quote(os.path.join(workdir, p.name, records.RESULT_FILE))
        cmd = shlex.join(command(p, config_spec, workdir, python))
        lines.append(f"  {i})  # {p.name}\n    [ -f {result} ] || exec {cmd} ;;")
    lines += ['  *) echo "no sweep point $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac", ""]
    path = os.path.join(workdir, "sweep.slurm")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
