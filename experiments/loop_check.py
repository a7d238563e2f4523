"""Scaled-down pruning recovery, MatFormer and funnel recovery through the one training loop, for comparing
two versions of the code on the same numbers (a refactor of the loop must reproduce them).

python experiments/loop_check.py --json experiments/results/loop_check/main.json

Each part is small enough for a 2-core CPU (about 3 minutes in all): lm_tiny shrunk to 64-byte windows and
30 steps, pruned by r_max at 20% and recovered by 10 distillation steps; MatFormer for 20 steps at four
nested widths; a 3-layer retrieval encoder, funnel surgery at layer 1 stride 2, then 5 recovery steps with
and without score distillation. Prints one JSON object (perplexities, bits per byte, recall@1).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import numpy as np

from effitrans import funnel, pruning
from effitrans.data.retrieval import retrieval_metrics
from effitrans.funnel import recovery
from effitrans.schema import load_config
from effitrans.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pruning_and_matformer(workdir: str) -> dict:
    cfg = load_config(os.path.join(ROOT, "configs", "lm_tiny.py"))
    cfg.data.update(seq_len=64, max_eval_batches=2, eval_batch_size=8)
    cfg.train.update(
        steps=30, batch_size=4, warmup_steps=3, log_every=10, eval_every=30, checkpoint_every=30, sample_tokens=0
    )
    trainer = Trainer(cfg, os.path.join(workdir, "lm"), peak_gflops=1.0, verbose=False)
    state = trainer.train()["state"]
    model = trainer.model_from(state["params"], state["model_state"])
    held_out = list(trainer.dataset.eval_batches())
    perplexity = lambda m: pruning.evaluate_lm(m, held_out)["perplexity"]
    out = {"dense_ppl": perplexity(model)}
    calib = np.concatenate([trainer.dataset.get_batch(10_000 + i)["inputs"] for i in range(2)])
    scores = pruning.neuron_importance(model, calib, "rmax", batch_size=4)
    small, _ = pruning.slice_model(model, cfg.model, pruning.keep_masks(scores, 0.2))
    out["pruned20_ppl_before"] = perplexity(small)
    dcfg = pruning.distill_config(steps=10, learning_rate=3e-4, warmup_steps=2, log_every=5)
    recovered, history = pruning.distill(small, model, lambda s: trainer.dataset.get_batch(20_000 + s), dcfg, log=None)
    out["pruned20_ppl_after_recovery"] = perplexity(recovered)
    out["recovery_last_loss"] = history[-1]["loss"]

    mcfg = copy.deepcopy(cfg)
    mcfg.train.update(steps=20, eval_every=20, checkpoint_every=20)
    widths = pruning.nested_widths(cfg.model.ffn_width, (0.25, 0.5, 0.75, 1.0))
    nested, _ = pruning.train_matformer(mcfg, widths, log=None)
    out["matformer_bits_per_byte"] = {
        w: pruning.evaluate_lm(pruning.extract(nested, cfg.model, w)[0], held_out)["bits"] for w in widths
    }
    return out


def funnel_recovery(workdir: str) -> dict:
    cfg = load_config(os.path.join(ROOT, "configs", "encoder_retrieval_small.py"))
    cfg.model.update(num_layers=3, d_model=64, num_heads=4, num_kv_heads=4, head_dim=16, ffn_width=128, embed_dim=32)
    cfg.data.update(query_len=32, doc_len=32, max_eval_examples=64)
    cfg.train.update(batch_size=16, steps=20, warmup_steps=2, log_every=10, eval_every=20, checkpoint_every=20)
    dense = Trainer(cfg, os.path.join(workdir, "enc"), peak_gflops=1.0, verbose=False)
    params = dense.train()["state"]["params"]
    recall = lambda t, p: float(retrieval_metrics(*t.eval_embeddings(p))["recall_at_1"])
    fcfg = copy.deepcopy(cfg)
    fcfg.model = funnel.funnel_config(cfg.model, at_layer=1, stride=2)
    fcfg.train.update(steps=5, learning_rate=3e-4, warmup_steps=1, eval_every=5, checkpoint_every=5, log_every=1)
    student = Trainer(fcfg, os.path.join(workdir, "rec"), peak_gflops=1.0, verbose=False)
    out = {"enc_dense_r1": recall(dense, params), "funnel_surgery_r1": recall(student, params)}
    recovered, _ = recovery.recover(student, params, 5)
    out["funnel_recovery_r1"] = recall(student, recovered)
    teacher = lambda tokens, mask: dense._embed_step(params, tokens, mask)
    distilled, last = recovery.recover(student, params, 5, teacher_embed=teacher, distill_weight=1.0)
    out["funnel_distill_r1"] = recall(student, distilled)
    out["funnel_distill_last_loss"] = float(last["loss"])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        out = {**pruning_and_matformer(workdir), **funnel_recovery(workdir)}
    out["seconds"] = round(time.time() - start, 1)
    print(json.dumps(out))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
