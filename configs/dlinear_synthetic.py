"""dlinear_synthetic: the DLinear baseline (decomposition + two linear maps over time) on the same series, windows
and splits as configs/autoformer_synthetic.py (--config.data.series=co2 with statsmodels installed)."""

from effitrans import defaults

INPUT_LEN, PRED_LEN = 96, 24


def get_config(arg=None):
    del arg
    data = defaults.data(
        "timeseries", series="synthetic", length=2000, num_series=1, input_len=INPUT_LEN, pred_len=PRED_LEN
    )
    data.eval_split = "test"
    model = defaults.model(name="dlinear")
    model.dlinear = defaults.dlinear(input_len=INPUT_LEN, pred_len=PRED_LEN)
    return defaults.experiment(
        model,
        data,
        defaults.train(
            task="forecast",
            steps=300,
            batch_size=32,
            learning_rate=1e-2,
            warmup_steps=20,
            weight_decay=0.0,
            checkpoint_every=100,
            eval_every=100,
            log_every=20,
        ),
        defaults.mesh(),
    )
