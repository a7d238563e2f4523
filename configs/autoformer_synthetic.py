"""autoformer_synthetic: Autoformer forecasting 24 steps from 96 of a synthetic hourly series (trend + daily and
weekly cycles + noise; effitrans.data.timeseries), MSE / MAE on the normalised test split.

With statsmodels installed (pip install 'effitrans[timeseries]'), --config.data.series=co2 runs it on the Mauna Loa
weekly CO2 series (univariate, 2,284 weeks).

Argument: `--config=configs/autoformer_synthetic.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

from effitrans import defaults
from effitrans.schema import apply_arg

INPUT_LEN, PRED_LEN = 96, 24


def get_config(arg=None):
    data = defaults.data(
        "timeseries", series="synthetic", length=2000, num_series=1, input_len=INPUT_LEN, pred_len=PRED_LEN
    )
    data.eval_split = "test"  # the paper's protocol; nothing is selected on it
    model = defaults.model(
        name="autoformer", d_model=64, num_heads=4, head_dim=16, ffn_width=128, ffn_activation="gelu"
    )
    model.autoformer = defaults.autoformer(input_len=INPUT_LEN, pred_len=PRED_LEN, label_len=INPUT_LEN // 2)
    config = defaults.experiment(
        model,
        data,
        defaults.train(
            task="forecast",
            steps=300,
            batch_size=32,
            learning_rate=1e-3,
            warmup_steps=20,
            weight_decay=0.0,
            checkpoint_every=100,
            eval_every=100,
            log_every=20,
        ),
        defaults.mesh(),
    )
    return apply_arg(config, arg)
