"""Training curves: `python -m effitrans.plot DIR [DIR ...] --metric=loss [--out=FILE.png]`.

One PNG with a line per run: `metric` against step from each run's metrics.jsonl. A DIR is a run's workdir,
or a sweep's workdir (each DIR/<point> holding a metrics.jsonl is a run). Where a resumed run logged a step
twice, the later row counts. Default --out: FIRST_DIR/<metric>.png.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

METRICS_FILE = "metrics.jsonl"


def run_dirs(paths: list[str]) -> list[str]:
    """The runs under `paths`: each path holding a metrics.jsonl, else its subdirectories that do (sorted).
    ValueError naming a path with neither."""
    out = []
    for path in paths:
        if os.path.isfile(os.path.join(path, METRICS_FILE)):
            out.append(path)
            continue
        subs = sorted(
            os.path.join(path, d)
            for d in (os.listdir(path) if os.path.isdir(path) else [])
            if os.path.isfile(os.path.join(path, d, METRICS_FILE))
        )
        if not subs:
            raise ValueError(f"{path}: no {METRICS_FILE} in it or in its subdirectories (allowed: a run's workdir)")
        out.extend(subs)
    return out


def curve(run_dir: str, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in RUN_DIR/metrics.jsonl, one value per step (the last logged)."""
    by_step: dict[int, float] = {}
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        for line in f:
            row = json.loads(line)
            if "event" not in row and row.get(metric) is not None:
                by_step[int(row["step"])] = float(row[metric])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(paths: list[str], metric: str, out: str) -> str:
    """Draws `metric` vs step of every run under `paths` into the PNG `out`; returns `out`. ValueError when no
    run logged `metric`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = run_dirs(paths)
    curves = {r: curve(r, metric) for r in runs}
    if not any(steps for steps, _ in curves.values()):
        raise ValueError(f"--metric={metric}: none of {len(runs)} run(s) logged it (e.g. loss, eval_loss, lr)")
    common = os.path.commonpath([os.path.abspath(r) for r in runs]) if len(runs) > 1 else None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, (steps, values) in curves.items():
        if steps:
            label = os.path.relpath(os.path.abspath(run), common) if common else os.path.basename(run.rstrip("/"))
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


_METRIC = flags.DEFINE_string("metric", "loss", "The metrics.jsonl column to draw against step.")
_OUT = flags.DEFINE_string("out", None, "The PNG to write (default FIRST_DIR/<metric>.png).")


def main(argv) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more run (or sweep) directories: python -m effitrans.plot DIR [DIR ...]")
    out = _OUT.value or os.path.join(paths[0], f"{_METRIC.value}.png")
    try:
        print(f"wrote {plot_curves(paths, _METRIC.value, out)}", flush=True)
    except ValueError as e:
        print(f"effitrans.plot: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
