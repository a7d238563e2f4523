"""Shared benchmark helpers: tables, JSON, subprocesses (timing, peak and machine: effitrans.perf).

Every `python -m effitrans.bench <what>` subcommand prints a human table and, with --json PATH,
writes {"machine": perf.machine_description(), "rows": [...]}; each row carries its baselines measured in
the same run. Nothing here asserts absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from effitrans.perf import machine_description


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table; columns are (row key, header). Missing values print as '-'."""
    cells = [[header for _, header in columns]]
    cells += [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """The same table in GitHub markdown (for docs)."""
    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | None, rows: Iterable[dict], machine: dict | None = None, **extra: Any) -> None:
    """Writes {"machine": ..., "rows": [...], **extra} to `path` (no-op when path is None)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"machine": machine if machine is not None else machine_description(), "rows": list(rows), **extra}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    print(f"wrote {path}")


def bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m effitrans.bench NAME` (help: the benchmark module's docstring), with --json."""
    parser = argparse.ArgumentParser(
        prog=f"python -m effitrans.bench {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None, help='write {"machine", "rows"} here')
    return parser


def save_figure(fig, path: str) -> None:
    """Lays out a matplotlib figure and writes it as a PNG to `path` (creating its folder)."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def run_json_subprocess(module: str, args: Sequence[str], timeout: float | None = None) -> dict:
    """Runs `python -m module args...` in a fresh process; its last stdout line must be JSON.

    A fresh process per measurement makes peak-memory (ru_maxrss) numbers independent of what ran
    before. Returns the parsed dict, or {"error": ...} when the process fails or times out.
    """
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [l for l in proc.stdout.strip().splitlines() if l.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"bad output: {lines[-1][:200]}"}


def build_model_fast(model_cfg):
    """The model of `model_cfg` with deterministic pseudo-random weights (uniform, fan-in scaled) written by
    one small compiled function. Decode speed does not depend on the weight values, and drawing them with
    the real initialisers compiles one threefry program per weight shape, which on a small shared CPU costs
    more than the measurement itself."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from effitrans.registry import build_model  # pylint: disable=import-outside-toplevel

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)))

    @jax.jit
    def fill(state):
        leaves, tree = jax.tree.flatten(state)
        out = []
        for i, x in enumerate(leaves):
            v = jnp.arange(x.size, dtype=jnp.float32) * 0.6180339887 + 0.1234 * i  # golden-ratio sequence
            scale = 3.46 / max(x.shape[0] if x.ndim else 1, 1) ** 0.5  # ~unit variance / fan-in
            out.append((((v % 1.0) - 0.5) * scale).reshape(x.shape).astype(x.dtype))
        return jax.tree.unflatten(tree, out)

    return nnx.merge(graphdef, fill(abstract))


def config_from_args(argv: Sequence[str], default: str, prog: str) -> tuple[Any, str, list[str]]:
    """(config, its --config spec, the other args) of a benchmark's argv: `--config=FILE[:key=value,...]`
    (default `default`) and `--config.a.b=value` overrides, parsed by ml_collections' config_flags as
    `python -m effitrans.main` parses them. A bad file, key or value exits 2 with one line naming it."""
    from absl import flags
    from ml_collections import config_flags

    from effitrans.schema import ConfigError, load_config

    argv, config_args, rest = list(argv), [], []
    while argv:
        arg = argv.pop(0)
        if arg == "--config" and argv:
            config_args.append(f"--config={argv.pop(0)}")
        elif arg.startswith(("--config=", "--config.")):
            config_args.append(arg)
        else:
            rest.append(arg)
    specs = [a.split("=", 1)[1] for a in config_args if a.startswith("--config=")]
    spec = specs[-1] if specs else default
    parse = [prog, f"--config={spec}", *[a for a in config_args if a.startswith("--config.")]]
    fl = flags.FlagValues()  # overrides are found in sys_argv (config_flags reads sys.argv without it)
    config_flags.DEFINE_config_file("config", None, "configs/*.py", flag_values=fl, lock_config=True, sys_argv=parse)
    try:
        base = load_config(spec)
        for arg in parse[2:]:
            key = arg[len("--config.") :].split("=", 1)[0]
            node, parts = base, key.split(".")
            for i, part in enumerate(parts):
                if not hasattr(node, "keys") or part not in node:
                    where = ".".join(["config", *parts[:i]])
                    known = sorted(node.keys()) if hasattr(node, "keys") else []
                    raise ConfigError(
                        f"bad config override {arg}: config.{key} does not exist; keys of {where}: {known}"
                    )
                node = node[part]
        fl(parse)
        return fl.config, spec, rest
    except (flags.Error, OSError, ConfigError, TypeError, ValueError, AttributeError, KeyError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
