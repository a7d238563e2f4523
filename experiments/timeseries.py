"""Forecasting on real series: Autoformer, the vanilla Transformer, DLinear, the CKCNN, the discrete CNN and the
seasonal-naive forecast on the same chronological splits; and the CKCNN's resolution independence.

    PYTHONPATH=. python experiments/timeseries.py --study grid        # models x series x horizons x seeds (CPU size)
    PYTHONPATH=. python experiments/timeseries.py --study resolution  # train at one rate, test at 2x and 0.5x
    PYTHONPATH=. python experiments/timeseries.py --study grid --series co2 --seeds 0 --steps 50  # a quick check

grid: every model of --models trains through the spine's Trainer (configs/<model>_synthetic.py, shrunk to CPU
size by SMALL) on each series of --series (statsmodels' co2, elnino, sunspots, nile) at each horizon of
`horizons(series)` (the paper's 96/192/336/720 where the splits hold them; shorter settings for the short
series), once per seed; the test split's MSE and MAE are
on the series normalised with its training part's statistics. Writes results/timeseries/grid.json, grid.png
(MSE per horizon per model, mean and seeds' spread) and forecast.png (one test window of each model).

resolution: the CKCNN and the discrete CNN of the same size train at spacing 1 on the synthetic series (trend,
cycles of 24 and 168 steps, noise) and are evaluated on the same test windows (the same times) with the series
resampled by linear interpolation at spacing 1/2 (2x the rate: 2L inputs, 2H targets; scored on every target and
on the original sample times alone, whose targets are the raw values) and 2 (0.5x). Goal: the CKCNN loses <= 10%
relative MSE at 2x while the CNN loses more. Writes results/timeseries/resolution.json and
resolution.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effitrans.data.timeseries import build_forecast_dataset, resampled_windows
from effitrans.models.forecast_baselines import seasonal_naive
from effitrans.schema import load_config
from effitrans.train.tasks import forecast_scores
from effitrans.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUT = os.path.join(ROOT, "experiments", "results", "timeseries")
MODELS = ("autoformer", "transformer_forecaster", "dlinear", "ckcnn", "cnn")
SERIES = ("co2", "elnino", "sunspots", "nile")
PERIODS = {"co2": 52, "elnino": 12, "sunspots": 11, "nile": 1, "synthetic": 24}  # seasonal-naive period
# CPU size: small widths, few steps (the machine is shared).
SMALL = dict(d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, ffn_width=64)
TRAIN = dict(batch_size=32, warmup_steps=10, eval_every=10**6, checkpoint_every=10**6, log_every=10**6)
GOAL_RELATIVE_LOSS = 0.10


def horizons(series: str) -> tuple[int, list[int]]:
    """(input_len, pred_lens) of a series: the paper's 96 -> 96/192/336/720 where the training part holds
    input_len + pred_len and the validation and test parts (10% and 20%) hold pred_len; shorter otherwise."""
    return {
        "co2": (96, [96, 192]),  # 2,284 weeks: validation part 228 (336 and 720 do not fit)
        "elnino": (96, [24, 48]),  # 732 months: validation part 73
        "sunspots": (48, [12, 24]),  # 309 years: validation part 31
        "nile": (24, [6]),  # 100 years: validation part 10
        "synthetic": (96, [24]),
    }[series]


def experiment_config(model: str, series: str, input_len: int, pred_len: int, seed: int, steps: int):
    """configs/<model>_synthetic.py on `series` with these lengths, SMALL widths and `steps`."""
    config = load_config(os.path.join(ROOT, "configs", f"{model}_synthetic.py"))
    m = config.model
    if model in ("autoformer", "transformer_forecaster"):
        m.update(SMALL)  # the CNNs and DLinear are small as shipped
    group = m[model]
    group.update(input_len=input_len, pred_len=pred_len)
    if model == "autoformer":
        group.update(label_len=input_len // 2, moving_avg=min(25, input_len // 2 * 2 - 1))
    if model == "dlinear":
        group.moving_avg = min(25, input_len // 2 * 2 - 1)
    config.data.update(series=series, input_len=input_len, pred_len=pred_len)
    config.train.update(TRAIN, steps=steps, seed=seed, warmup_steps=min(10, steps // 5))
    return config


def train(config) -> tuple[nnx.Module, dict, Trainer, float]:
    """Trains `config` in a temporary workdir: (model, held-out metrics, trainer, seconds)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, peak_gflops=1.0, verbose=False)
        result = trainer.train()
        model = trainer.model_from(result["state"]["params"], result["state"]["model_state"])
    return model, result["eval"], trainer, time.perf_counter() - t0


def run_grid(args) -> dict:
    rows, examples = [], {}
    for series in args.series:
        input_len, pred_lens = horizons(series)
        for pred_len in pred_lens[args.first_horizon : args.max_horizons]:
            data = build_forecast_dataset(
                series=series, input_len=input_len, pred_len=pred_len, eval_split="test", global_batch_size=32, seed=0
            )
            period = min(PERIODS[series], input_len)
            naive = forecast_scores(lambda x, p=period, h=pred_len: seasonal_naive(x, p, h), data)
            rows.append(dict(series=series, pred_len=pred_len, model="seasonal_naive", seed=0, **naive))
            window = data._eval_rows(np.array([data.num_eval_rows // 2]))  # one test window for the plot
            examples[(series, pred_len)] = {
                "inputs": window["inputs"][0, :, 0].tolist(),
                "targets": window["targets"][0, :, 0].tolist(),
            }
            for model_name in args.models:
                for seed in args.seeds[:1] if model_name in args.single_seed_models else args.seeds:
                    cfg = experiment_config(model_name, series, input_len, pred_len, seed, args.steps)
                    model, ev, _, seconds = train(cfg)
                    row = dict(
                        series=series,
                        pred_len=pred_len,
                        model=model_name,
                        seed=seed,
                        mse=ev["eval_mse"],
                        mae=ev["eval_mae"],
                        examples=ev["eval_examples"],
                        seconds=seconds,
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if seed == args.seeds[0]:
                        y = model(jnp.asarray(window["inputs"]), training=False)
                        examples[(series, pred_len)][model_name] = np.asarray(y)[0, :, 0].tolist()
            write_json(args, grid_payload(rows, examples, args))  # after every setting: a partial run keeps its rows
    return grid_payload(rows, examples, args)


def merge_grids(args) -> dict:
    """One grid payload from --parts: grid.json files, or the logs of grid runs (their JSON row lines; a run
    stopped early keeps the rows it printed). Seasonal-naive rows are recomputed for settings without them."""
    rows, examples = [], {}
    for path in args.parts.split(","):
        with open(path) as f:
            text = f.read()
        if path.endswith(".json"):
            part = json.loads(text)
            rows += part["rows"]
            examples |= {(k.split("/")[0], int(k.split("/")[1])): v for k, v in part["examples"].items()}
        else:
            rows += [json.loads(line) for line in text.splitlines() if line.startswith('{"series"')]
    for series, pred_len in sorted({(r["series"], r["pred_len"]) for r in rows}):
        if not any(r["model"] == "seasonal_naive" and (r["series"], r["pred_len"]) == (series, pred_len) for r in rows):
            input_len = horizons(series)[0]
            data = build_forecast_dataset(
                series=series, input_len=input_len, pred_len=pred_len, eval_split="test", global_batch_size=32, seed=0
            )
            period = min(PERIODS[series], input_len)
            naive = forecast_scores(lambda x, p=period, h=pred_len: seasonal_naive(x, p, h), data)
            rows.append(dict(series=series, pred_len=pred_len, model="seasonal_naive", seed=0, **naive))
    return grid_payload(rows, examples, args)


def grid_payload(rows, examples, args) -> dict:
    summary = summarise(rows)
    payload = {"rows": rows, "summary": summary, "goals": grid_goals(summary), "args": vars(args)}
    payload["examples"] = {f"{s}/{h}": v for (s, h), v in examples.items()}
    return payload


def write_json(args, payload) -> str:
    """payload + date and devices -> <out>/<study>.json; returns the path."""
    payload = dict(payload, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), devices=str(jax.devices()))
    path = os.path.join(args.out, f"{args.study}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def summarise(rows) -> list[dict]:
    """Mean, std, min and max of MSE and MAE over seeds, per (series, pred_len, model)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["series"], r["pred_len"], r["model"]), []).append(r)
    out = []
    for (series, pred_len, model), rs in groups.items():
        mse, mae = np.array([r["mse"] for r in rs]), np.array([r["mae"] for r in rs])
        out.append(
            dict(
                series=series,
                pred_len=pred_len,
                model=model,
                seeds=len(rs),
                mse=float(mse.mean()),
                mse_std=float(mse.std()),
                mse_min=float(mse.min()),
                mse_max=float(mse.max()),
                mae=float(mae.mean()),
            )
        )
    return out


def grid_goals(summary) -> dict:
    """Autoformer vs the Transformer at every horizon of each series; where DLinear is best of all."""
    mean = {(s["series"], s["pred_len"], s["model"]): s["mse"] for s in summary}
    settings = sorted({(s, h) for s, h, _ in mean})
    beats = {}
    for series in sorted({s for s, _ in settings}):
        hs = [h for s, h in settings if s == series]
        pairs = [(mean.get((series, h, "autoformer")), mean.get((series, h, "transformer_forecaster"))) for h in hs]
        if all(a is not None and t is not None for a, t in pairs):
            beats[series] = all(a < t for a, t in pairs)
    best = {
        f"{s}/{h}": min((m for ss, hh, m in mean if (ss, hh) == (s, h)), key=lambda m: mean[(s, h, m)])
        for s, h in settings
    }
    return {
        "autoformer_beats_transformer_at_every_horizon": beats,
        "series_where_it_does": sum(beats.values()),
        "goal_met": sum(beats.values()) >= 2,
        "best_model": best,
    }


# ---- resolution independence ------------------------------------------------------------------------


def run_resolution(args) -> dict:
    input_len, (pred_len,) = horizons("synthetic")
    spacings = (1.0, 0.5, 2.0)
    rows = []
    curves = {}
    for model_name in ("ckcnn", "cnn"):
        for seed in args.seeds:
            cfg = experiment_config(model_name, "synthetic", input_len, pred_len, seed, args.steps)
            model, ev, trainer, seconds = train(cfg)
            data = trainer.dataset
            start, end = data.bounds["test"]
            starts = np.arange(start, end - pred_len, 2)  # every second time (aligned at spacing 2), inside the series
            row = dict(model=model_name, seed=seed, trainer_test_mse=ev["eval_mse"], seconds=seconds)
            for s in spacings:
                x, y = resampled_windows(data.values, starts, input_len, pred_len, s)
                fn = nnx.jit(lambda m, x, h=y.shape[1], s=s: m.forecast(x, h, s))
                pred = np.asarray(fn(model, jnp.asarray(x)))
                row[f"mse_at_{s:g}"] = float(np.mean((pred - y) ** 2))
                if s < 1:  # the forecast at the original sample times only (their targets are the raw values)
                    step = round(1 / s)
                    row[f"mse_at_{s:g}_original_times"] = float(np.mean((pred[:, ::step] - y[:, ::step]) ** 2))
                if seed == args.seeds[0]:
                    curves.setdefault(f"{s:g}", {"targets": y[0, :, 0].tolist()})[model_name] = pred[0, :, 0].tolist()
            for key in ("0.5", "0.5_original_times", "2"):
                row[f"relative_loss_at_{key}"] = row[f"mse_at_{key}"] / row["mse_at_1"] - 1.0
            rows.append(row)
            print(json.dumps(row), flush=True)
    mean = lambda m, k: float(np.mean([r[k] for r in rows if r["model"] == m]))
    ck2, cnn2 = mean("ckcnn", "relative_loss_at_0.5"), mean("cnn", "relative_loss_at_0.5")
    goals = {
        "ckcnn_relative_loss_at_2x": ck2,
        "cnn_relative_loss_at_2x": cnn2,
        "ckcnn_at_most_10pct": ck2 <= GOAL_RELATIVE_LOSS,
        "cnn_loses_more": cnn2 > ck2,
        "ckcnn_relative_loss_at_2x_original_times": mean("ckcnn", "relative_loss_at_0.5_original_times"),
        "cnn_relative_loss_at_2x_original_times": mean("cnn", "relative_loss_at_0.5_original_times"),
        "ckcnn_relative_loss_at_half_rate": mean("ckcnn", "relative_loss_at_2"),
        "cnn_relative_loss_at_half_rate": mean("cnn", "relative_loss_at_2"),
    }
    return {"rows": rows, "goals": goals, "curves": curves, "args": vars(args)}


# ---- figures --------------------------------------------------------------------------------------------


def plot_grid(payload, path_mse: str, path_forecast: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effitrans.bench.common import save_figure

    summary = payload["summary"]
    series = sorted({s["series"] for s in summary}, key=SERIES.index)
    models = [m for m in ("seasonal_naive", *MODELS) if any(s["model"] == m for s in summary)]
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.8), squeeze=False)
    width = 0.8 / len(models)
    for ax, name in zip(axes[0], series):
        hs = sorted({s["pred_len"] for s in summary if s["series"] == name})
        for i, model in enumerate(models):
            for j, h in enumerate(hs):
                got = [s for s in summary if (s["series"], s["pred_len"], s["model"]) == (name, h, model)]
                if got:
                    g = got[0]
                    err = [[g["mse"] - g["mse_min"]], [g["mse_max"] - g["mse"]]]
                    ax.bar(
                        j + i * width,
                        g["mse"],
                        width,
                        yerr=err,
                        capsize=2,
                        color=f"C{i}",
                        label=model if j == 0 else None,
                    )
        ax.set_xticks(np.arange(len(hs)) + 0.4 - width / 2, [f"H = {h}" for h in hs])
        ax.set(title=f"{name}: mean and seeds' range", ylabel="test MSE (normalised)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(models))]
    axes[0][0].legend(handles, models, fontsize=7)
    save_figure(fig, path_mse)
    if not payload["examples"]:
        print("no forecast examples (merged from logs only): forecast.png not written")
        return
    key = next(iter(payload["examples"]))
    ex = payload["examples"][key]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    n_in = len(ex["inputs"])
    ax.plot(range(n_in), ex["inputs"], color="k", label="input")
    ax.plot(range(n_in, n_in + len(ex["targets"])), ex["targets"], color="k", ls="--", label="target")
    for model in MODELS:
        if model in ex:
            ax.plot(range(n_in, n_in + len(ex[model])), ex[model], label=model)
    ax.set(title=f"one test window: {key} (normalised)", xlabel="step")
    ax.legend(fontsize=7)
    save_figure(fig, path_forecast)


def plot_resolution(payload, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effitrans.bench.common import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    spacings = ("1", "0.5", "2")
    for i, model in enumerate(("ckcnn", "cnn")):
        rs = [r for r in payload["rows"] if r["model"] == model]
        means = [np.mean([r[f"mse_at_{s}"] for r in rs]) for s in spacings]
        axes[0].bar(np.arange(3) + 0.38 * i, means, width=0.38, label=model)
        for j, s in enumerate(spacings):
            axes[0].scatter([j + 0.38 * i] * len(rs), [r[f"mse_at_{s}"] for r in rs], color="k", s=8)
    axes[0].set_xticks(np.arange(3) + 0.19, ["1x (trained)", "2x", "0.5x"])
    axes[0].set(ylabel="test MSE (normalised, log scale)", title="sampling rate at evaluation", yscale="log")
    axes[0].legend()
    curve = payload["curves"]["0.5"]
    t = np.arange(len(curve["targets"])) * 0.5
    axes[1].plot(t, curve["targets"], "k--", label="target (2x rate)")
    for model in ("ckcnn", "cnn"):
        axes[1].plot(t, curve[model], label=model)
    axes[1].set(xlabel="time after the window (training steps)", title="one test window at 2x the rate")
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=("grid", "resolution", "merge"), required=True)
    p.add_argument("--parts", default="", help="merge: comma-separated grid.json files or grid-run logs")
    p.add_argument("--models", default=",".join(MODELS), help="grid: comma-separated, of " + ",".join(MODELS))
    p.add_argument("--series", default=",".join(SERIES), help="grid: comma-separated, of " + ",".join(SERIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--single_seed_models", default="", help="grid: models trained on the first seed only")
    p.add_argument("--max_horizons", type=int, default=None, help="grid: only the first n horizons of each series")
    p.add_argument("--first_horizon", type=int, default=0, help="grid: skip the first n horizons of each series")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    args.models, args.series = args.models.split(","), args.series.split(",")
    args.single_seed_models = [m for m in args.single_seed_models.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for name, given, allowed in (("models", args.models, MODELS), ("series", args.series, SERIES)):
        bad = [g for g in given if g not in allowed]
        if bad:
            p.error(f"--{name}: {bad} not in {list(allowed)}")
    os.makedirs(args.out, exist_ok=True)
    if args.study == "grid":
        payload = run_grid(args)
        plot_grid(payload, os.path.join(args.out, "grid.png"), os.path.join(args.out, "forecast.png"))
    elif args.study == "merge":
        payload = merge_grids(args)
        args.study = "grid"
        plot_grid(payload, os.path.join(args.out, "grid.png"), os.path.join(args.out, "forecast.png"))
    else:
        payload = run_resolution(args)
        plot_resolution(payload, os.path.join(args.out, "resolution.png"))
    path = write_json(args, payload)
    print(f"wrote {path}\ngoals: {json.dumps(payload['goals'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
