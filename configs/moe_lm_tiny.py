"""moe_lm_tiny: lm_tiny with a mixture-of-experts feed-forward in its second layer (the first stays dense, as
in DeepSeek-V3): 8 experts of width 96, top-2 routing plus one shared expert, so a token uses 3 x 96 = 288
expert neurons (lm_tiny's dense layer has 384). Dropless dispatch, Switch aux loss and the aux-loss-free bias.

python -m effitrans.main --config=configs/moe_lm_tiny.py --workdir=/tmp/moe_lm_tiny
"""

from effitrans import defaults


def get_config(arg=None):
    del arg
    model = defaults.model(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, ffn_width=384)
    model.moe = defaults.moe(
        layers=[1],  # layer 0 keeps its dense GLU
        num_experts=8,
        expert_width=96,
        top_k=2,
        num_shared_experts=1,
        gating="sigmoid",  # DeepSeek-V3: normalised sigmoid scores
        dispatch="dropless",
        aux_loss_weight=0.01,
        bias_update_rate=1e-3,
    )
    return defaults.experiment(
        model,
        defaults.data("text_lm", seq_len=128, max_eval_batches=8),
        defaults.train(
            steps=200,
            batch_size=16,
            learning_rate=3e-3,
            warmup_steps=20,
            checkpoint_every=50,
            eval_every=100,
            log_every=10,
        ),
        defaults.mesh(),
    )
