"""Pruning whole experts of an MoE LM: the held-out loss cost of dropping each expert alone, and of dropping
the d lowest-scoring experts of every MoE layer by load, output norm or at random. Writes
experiments/results/moe/expert_pruning.{json,png}.

    python experiments/moe_expert_pruning.py --config=configs/moe_lm_tiny.py --workdir=/tmp/moe_lm_tiny

The model trains through the one Trainer in --workdir (resumed or skipped when it already holds the final
checkpoint); calibration statistics come from training batches, the loss from the held-out split.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from effitrans import pruning
from effitrans.perf import machine_description

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "experiments", "results", "moe")

config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs", "moe_lm_tiny.py"), "an MoE LM config")
flags.DEFINE_string("workdir", None, "training run directory (resumed; reused when finished)", required=True)
flags.DEFINE_integer("calibration_batches", 8, "training batches for the expert statistics", lower_bound=1)
flags.DEFINE_string("out", OUT, "results directory")
FLAGS = flags.FLAGS


def held_out_loss(model, trainer) -> float:
    return pruning.evaluate_lm(model, trainer.dataset.eval_batches())["loss"]


def run(config, workdir: str, calibration_batches: int) -> dict:
    from effitrans.train.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(config, workdir)
    state = trainer.train()["state"]  # a finished run restores its last checkpoint and trains nothing
    model = trainer.model_from(state["params"], state["model_state"])
    trainer.checkpointer.close()
    print(f"[moe pruning] trained/restored in {time.perf_counter() - t0:.0f}s", flush=True)

    stats = pruning.expert_statistics(model, [trainer.train_batch(s) for s in range(calibration_batches)])
    layers = [i for i, _ in pruning.moe_ffns(model)]
    counts = [int(s["load"].size) for s in stats]
    base = held_out_loss(model, trainer)
    print(f"[moe pruning] full model held-out loss {base:.4f}; MoE layers {layers}, experts {counts}", flush=True)

    single = []  # drop one expert of one layer
    for li, (layer, e_count) in enumerate(zip(layers, counts)):
        for e in range(e_count):
            keep = [np.ones(c, bool) for c in counts]
            keep[li][e] = False
            small, _ = pruning.drop_experts(model, config.model, keep)
            loss = held_out_loss(small, trainer)
            row = {
                "layer": layer,
                "expert": e,
                "load_share": float(stats[li]["load"][e] / stats[li]["load"].sum()),
                "output_norm": float(stats[li]["output_norm"][e] / max(float(stats[li]["tokens"]), 1.0)),
                "loss": loss,
                "delta_loss": loss - base,
            }
            single.append(row)
            print(f"[moe pruning] drop layer {layer} expert {e}: loss {loss:.4f} ({loss - base:+.4f})", flush=True)

    top_k = pruning.moe_ffns(model)[0][1].top_k
    curves = {}
    for criterion in pruning.EXPERT_CRITERIA:
        scores = pruning.expert_importance(stats, criterion)
        rows = []
        for d in range(0, min(counts) - top_k + 1):
            small, small_cfg = pruning.drop_experts(model, config.model, pruning.keep_experts(scores, drop=d))
            rows.append(
                {
                    "dropped_per_layer": d,
                    "experts": list(small_cfg.moe.num_experts),
                    "loss": held_out_loss(small, trainer),
                }
            )
            print(f"[moe pruning] {criterion}: drop {d} per layer -> loss {rows[-1]['loss']:.4f}", flush=True)
        curves[criterion] = rows
    corr = np.corrcoef([r["load_share"] for r in single], [r["delta_loss"] for r in single])[0, 1]
    return {
        "config": config.to_dict(),
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join(sys.argv),
        "base_loss": base,
        "moe_layers": layers,
        "single_expert": single,
        "load_vs_delta_loss_correlation": float(corr),
        "curves": curves,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    single = result["single_expert"]
    a.scatter([r["load_share"] for r in single], [r["delta_loss"] for r in single])
    for r in single:
        a.annotate(f"L{r['layer']}e{r['expert']}", (r["load_share"], r["delta_loss"]), fontsize=7)
    a.set_xlabel("expert's share of the routed assignments (calibration)")
    a.set_ylabel("held-out loss change when dropped alone (nats)")
    a.set_title("one expert dropped")
    for criterion, rows in result["curves"].items():
        b.plot([r["dropped_per_layer"] for r in rows], [r["loss"] for r in rows], marker="o", label=criterion)
    b.axhline(result["base_loss"], color="gray", ls=":", label="full model")
    b.set_xlabel("experts dropped per MoE layer")
    b.set_ylabel("held-out loss (nats)")
    b.set_title("lowest-scoring experts dropped")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv) -> None:
    del argv
    result = run(FLAGS.config, FLAGS.workdir, FLAGS.calibration_batches)
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "expert_pruning.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    plot(result, os.path.join(FLAGS.out, "expert_pruning.png"))
    print(f"[moe pruning] wrote {FLAGS.out}/expert_pruning.json and .png", flush=True)


if __name__ == "__main__":
    app.run(main)
