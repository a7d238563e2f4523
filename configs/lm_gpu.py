"""lm_gpu: a 308M-parameter byte-level LM at sequence 2048 for one accelerator (bf16 compute, f32 params).

d_model 1024, 24 layers, 16 heads x 64, FFN 2816. The 24 homogeneous blocks run as one lax.scan
(model.scan_layers), so the step compiles one block instead of 24; attention is impl "auto" (cuDNN on
an NVIDIA GPU, Pallas on TPU). remat stays "none": batch 16 x 2048 keeps its activations in an H200's
memory; set --config.model.remat=dots_saveable for larger batches.

python -m effitrans.main --config=configs/lm_gpu.py --workdir=/tmp/lm_gpu
python -m effitrans.bench train --config=configs/lm_gpu.py

Argument: `--config=configs/lm_gpu.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

from effitrans import defaults
from effitrans.schema import apply_arg


def get_config(arg=None):
    config = defaults.experiment(
        defaults.model(
            d_model=1024,
            num_layers=24,
            num_heads=16,
            num_kv_heads=16,
            head_dim=64,
            ffn_width=2816,
            dtype="bfloat16",
            scan_layers=True,
            remat="none",
        ),
        defaults.data("text_lm", seq_len=2048, max_eval_batches=8),
        defaults.train(
            steps=2000,
            batch_size=16,
            learning_rate=3e-4,
            warmup_steps=200,
            checkpoint_every=500,
            eval_every=500,
            log_every=10,
        ),
        defaults.mesh(),
    )
    return apply_arg(config, arg)
