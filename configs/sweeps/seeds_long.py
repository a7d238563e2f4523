"""Seeds at a longer training budget: the same config trained for `steps` steps (default 1600) with seeds
0 and 1, held-out loss every `steps / 8` steps. Run once per model to compare two configs at equal tokens and
the same data order per seed (the data order follows train.seed), e.g. dense against MoE of equal active
parameters:

    python -m effitrans.sweep --config=configs/lm_tiny.py --sweep=configs/sweeps/seeds_long.py --workdir=DIR/dense
    python -m effitrans.sweep --config=configs/moe_lm_tiny.py:model.moe.top_k=3 \\
        --sweep=configs/sweeps/seeds_long.py --workdir=DIR/moe

Argument (`seeds_long.py:steps=800,seeds=0-1-2`): the step budget and the seeds ("-"-separated).
"""

from effitrans import sweep


def get_sweep(arg=None):
    values = dict(part.split("=", 1) for part in arg.split(",")) if arg else {}
    steps = int(values.pop("steps", 1600))
    seeds = [int(s) for s in values.pop("seeds", "0-1").split("-")]
    if values:
        raise ValueError(f"unknown sweep argument keys {sorted(values)}: allowed steps=N,seeds=A-B-...")
    if steps < 8:
        raise ValueError(f"steps={steps} is not allowed: expected an int >= 8 (held-out loss every steps / 8)")
    budget = {
        "train.steps": [steps],
        "train.warmup_steps": [steps // 10],
        "train.eval_every": [steps // 8],
        "train.checkpoint_every": [steps // 8],
        "train.log_every": [steps // 16],
    }
    return [sweep.Point(f"seed={s}", p) for s, p in zip(seeds, sweep.product({"train.seed": seeds}, budget))]
