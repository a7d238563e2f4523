"""The workdir cases of the reliability probes, run through `python -m effitrans.main` of a source tree, for
comparing two versions of the code: what each case returns and leaves on disk.

python experiments/reliability_cases.py --tree . --json experiments/results/reliability/after.json
python experiments/reliability_cases.py --tree /path/to/older/checkout --json .../before.json

Cases (lm_tiny shrunk to 1 layer, 32-byte windows, a few steps; about 4 minutes on 2 cores):
  corrupt_newest     train to 6 (checkpoints 2, 4, 6), truncate the largest file of step 6, rerun to 8
  attention_changed  train to 4, rerun to 6 with model.attention.kind=sliding_window
  activation_changed train to 4, rerun to 6 with another model.ffn_activation
  overflow           learning rate 3.4e38 with a checkpoint every step: a finite loss, then inf weights
  eval_empty         --mode=eval on a workdir that was never trained
  fewer_steps        train to 4, rerun with train.steps=2
  bad_value          --config.train.b1=1.5
Each records the exit code, the last lines of output, and the checkpoint steps before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

BASE = [
    "--config=configs/lm_tiny.py",
    "--config.model.num_layers=1",
    "--config.data.seq_len=32",
    "--config.data.max_eval_batches=1",
    "--config.train.batch_size=8",
    "--config.train.warmup_steps=1",
    "--config.train.log_every=2",
    "--config.train.eval_every=1000",
    "--config.train.checkpoint_every=2",
    "--config.train.sample_tokens=0",
]


def run(tree: str, workdir: str, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "effitrans.main", f"--workdir={workdir}", *BASE, *extra]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    out = (p.stdout + p.stderr).strip().splitlines()
    return {"args": list(extra), "rc": p.returncode, "traceback": any("Traceback" in x for x in out), "tail": out[-3:]}


def steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def set_aside(workdir: str) -> list[str]:
    d = os.path.join(workdir, "checkpoints.set_aside")
    return sorted(n.rsplit("-", 1)[0] for n in os.listdir(d)) if os.path.isdir(d) else []


def truncate_largest(step_dir: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    return os.path.relpath(largest, step_dir)


def cases(tree: str, tmp: str) -> dict:
    out = {}
    w = os.path.join(tmp, "corrupt")
    run(tree, w, "--config.train.steps=6")
    truncated = truncate_largest(os.path.join(w, "checkpoints", "6", "state"))
    runs = [run(tree, w, "--config.train.steps=8") for _ in range(2)]  # twice: a workdir must stay usable
    out["corrupt_newest"] = {"truncated": truncated, "reruns": runs, "steps": steps(w), "set_aside": set_aside(w)}

    for name, change in [
        ("attention_changed", "--config.model.attention.kind=sliding_window"),
        ("activation_changed", "--config.model.ffn_activation=gelu"),
    ]:
        w = os.path.join(tmp, name)
        run(tree, w, "--config.train.steps=4")
        before = steps(w)
        r = run(tree, w, "--config.train.steps=6", change)
        out[name] = {"rerun": r, "steps_before": before, "steps_after": steps(w), "set_aside": set_aside(w)}

    w = os.path.join(tmp, "overflow")
    r = run(
        tree,
        w,
        "--config.train.steps=3",
        "--config.train.learning_rate=3.4e38",
        "--config.train.warmup_steps=0",
        "--config.train.checkpoint_every=1",
    )
    out["overflow"] = {"run": r, "steps": steps(w)}

    w = os.path.join(tmp, "eval_empty")
    out["eval_empty"] = {"run": run(tree, w, "--mode=eval"), "workdir_created": os.path.isdir(w)}

    w = os.path.join(tmp, "fewer_steps")
    run(tree, w, "--config.train.steps=4")
    out["fewer_steps"] = {"rerun": run(tree, w, "--config.train.steps=2"), "steps": steps(w)}

    out["bad_value"] = {"run": run(tree, os.path.join(tmp, "bad"), "--config.train.b1=1.5")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=".", help="source tree whose effitrans runs the cases")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    tree = os.path.abspath(args.tree)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"tree": tree, "commit": _commit(tree), "cases": cases(tree, tmp)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")


def _commit(tree: str) -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return p.stdout.strip()


if __name__ == "__main__":
    main()
