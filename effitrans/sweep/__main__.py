"""`python -m effitrans.sweep --config=configs/X.py --sweep=configs/sweeps/Y.py --workdir=DIR [--parallel=N]
[--dry_run | --emit=slurm | --collect] [--metric=M --key=K]`: the command line of effitrans.sweep (see there).

Exit codes: 0 every point finished (or printed, emitted, collected); 1 a point failed (its log says why;
rerun to resume); 2 a bad flag, config, sweep file or override, found before any point runs.
"""

from __future__ import annotations

import shlex
import sys

from absl import app, flags

from effitrans.schema import ConfigError
from effitrans.sweep import (
    Point,
    check_points,
    collect,
    command,
    emit_slurm,
    load_sweep,
    plot,
    read_points,
    run_points,
    write_points,
    write_table,
)

_CONFIG = flags.DEFINE_string(
    "config", None, "The configs/*.py file every point starts from (file.py[:key=value,...])."
)
_SWEEP = flags.DEFINE_string(
    "sweep", None, "The configs/sweeps/*.py file (file.py[:arg]) whose get_sweep lists points."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory: one run per point in DIR/<point>, tables at the top.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points run at the same time.", lower_bound=1)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each point's command and run nothing.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only collect DIR's results into tables (and the plot).")
_EMIT = flags.DEFINE_enum("emit", None, ["slurm"], "Write DIR/sweep.slurm (one array task per point); run nothing.")
_METRIC = flags.DEFINE_string(
    "metric", None, "Metric of the plot (default: eval_loss, else an eval_* column, else loss)."
)
_KEY = flags.DEFINE_string("key", None, "Override key on the plot's x axis (default: the first one).")

PROG = "effitrans.sweep"


def _say(msg: str) -> None:
    print(f"[{PROG}] {msg}", flush=True)


def _report(workdir: str, points: list[Point]) -> None:
    rows = collect(workdir, points)
    for path in write_table(workdir, rows):
        _say(f"wrote {path}")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    evals = [c for c in columns if c.startswith("eval_")]
    metric = _METRIC.value or ("eval_loss" if "eval_loss" in evals else next(iter(evals), "loss"))
    key = _KEY.value or next((c for c in columns if "." in c), None)
    if key is None:
        return
    try:
        _say(f"wrote {plot(workdir, rows, metric, key)}")
    except ImportError:
        _say("no plot: matplotlib is not installed (pip install -e '.[plots]')")
    except ValueError as e:
        if _METRIC.value or _KEY.value:
            raise ConfigError(str(e)) from None
        _say(f"no plot: {e}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every argument is a flag, --name=value")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        if _COLLECT.value:
            _report(_WORKDIR.value, read_points(_WORKDIR.value))
            return
        if not _CONFIG.value or not _SWEEP.value:
            raise app.UsageError("--config and --sweep are required (or --collect with a sweep's --workdir)")
        points = load_sweep(_SWEEP.value)
        check_points(_CONFIG.value, points)
        _say(f"{len(points)} points: {', '.join(p.name for p in points)}")
        if _DRY_RUN.value:
            for p in points:
                print(shlex.join(command(p, _CONFIG.value, _WORKDIR.value)))
            return
        write_points(_WORKDIR.value, _CONFIG.value, _SWEEP.value, points)
        if _EMIT.value == "slurm":
            _say(f"wrote {emit_slurm(points, _CONFIG.value, _WORKDIR.value)}: sbatch it, then rerun with --collect")
            return
        status = run_points(points, _CONFIG.value, _WORKDIR.value, parallel=_PARALLEL.value, log=_say)
        _report(_WORKDIR.value, points)
        failed = [n for n, s in status.items() if s.startswith("failed")]
        if failed:
            _say(f"{len(failed)} point(s) failed: {', '.join(failed)}; see DIR/<point>/log.txt, rerun to resume")
            sys.exit(1)
    except (ConfigError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
