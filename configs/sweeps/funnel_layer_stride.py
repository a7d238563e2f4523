"""Funnels trained from scratch on encoder_retrieval_small's task: funnel layer k x stride, at the training
budget of docs/results/funnel.md (200 steps x 32 pairs, 1024 held-out pairs).

    python -m effitrans.sweep --config=configs/funnel_retrieval_small.py \
        --sweep=configs/sweeps/funnel_layer_stride.py --workdir=DIR --key=model.funnel.block_layers

Argument (`funnel_layer_stride.py:k=2,s=2`): one point, funnel after layer k with stride s.
"""

from effitrans import sweep

LAYERS = 6  # encoder_retrieval_small's depth

# The training of the recorded funnel study (experiments/funnel_sweep.py --steps=200 --train_batch=32
# --max_eval=1024): warmup 10% of the steps, held-out batches of 32, the reference attention kernel.
BUDGET = {
    "train.steps": [200],
    "train.batch_size": [32],
    "train.warmup_steps": [20],
    "train.log_every": [40],
    "train.eval_every": [200],
    "train.checkpoint_every": [200],
    "data.max_eval_examples": [1024],
    "data.eval_batch_size": [32],
    "model.attention.impl": ["reference"],
}


def get_sweep(arg=None):
    layers, strides = list(range(1, LAYERS)), [2, 4]
    if arg:
        values = dict(part.split("=", 1) for part in arg.split(","))
        layers, strides = [int(values.pop("k"))], [int(values.pop("s"))]
        if values:
            raise ValueError(f"unknown sweep argument keys {sorted(values)}: allowed k=LAYER,s=STRIDE")
    funnels = sweep.zipped({"model.funnel.block_layers": [[k, LAYERS - k] for k in layers]})
    points = sweep.product(funnels, {"model.funnel.strides": [[s] for s in strides]}, BUDGET)
    if arg:  # one point: name it by its funnel (the varying keys of a single point are all of its keys)
        return [sweep.Point(f"block_layers={layers[0]}-{LAYERS - layers[0]},strides={strides[0]}", points[0])]
    return points
