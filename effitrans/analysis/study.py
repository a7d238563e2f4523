"""`python -m effitrans.analysis attention`: read a model's attention, choose a mask per layer, check it.

    python -m effitrans.analysis attention --model=smollm2 --seq_len=1024
    python -m effitrans.analysis attention --config=configs/lm_tiny.py --workdir=DIR

Reads the attention of --passages calibration rows (training text), writes per-layer / per-head statistics,
the coverage of every candidate mask, the cheapest pattern per layer keeping >= X of the mass (one
recommendation per --coverage X), and validates each on held-out text: perplexity with the recommended
per-layer masks vs dense vs a uniform causal window of at least the same total density. Output: results.json,
maps.png (attention maps of chosen heads), stats.png (statistics per layer and head) and coverage.png
(coverage vs density per layer) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from absl import logging

from effitrans.analysis import attention_maps as am
from effitrans.analysis import mask_coverage as mc
from effitrans.perf import machine_description

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "experiments", "results", "attention_maps")
MODELS = ("smollm2",)
# Head types named in the report: a head is a sink / local / periodic head when its statistic passes these.
SINK_HEAD = 0.5  # mass on the first `sink` keys
LOCAL_HEAD = 0.5  # mass within `band` tokens of the diagonal
PERIODIC_LIFT = 2.0  # mass on multiples of its period beyond the band, over chance ...
PERIODIC_MASS = 0.1  # ... and at least this share of all its mass


def analyse(model, rows, *, candidates: dict, block_q: int = 128, sink: int = 4, band: int = 8, batch: int = 1):
    """Per-layer statistics of `model`'s attention over token rows int [P, T], summed over the P rows.

    Returns (stats: one `head_statistics` dict per layer, q and k of the first row's batch for the maps).
    """
    rows = np.asarray(rows)
    names, masks = list(candidates), tuple(candidates.values())
    sums, first = None, None
    for start in range(0, rows.shape[0], batch):
        q, k, supports = am.layer_qk(model, rows[start : start + batch])  # [L, B, T, N, H], [L, B, T, K, H]
        first = first or (q, k, supports)
        layer_sums = [
            am.attention_sums(q[i], k[i], support=supports[i], candidates=masks, block_q=block_q, sink=sink)
            for i in range(q.shape[0])
        ]
        sums = [am.add_sums(None if sums is None else sums[i], s) for i, s in enumerate(layer_sums)]
        logging.info("attention of rows %d..%d of %d read", start, start + q.shape[1] - 1, rows.shape[0])
    stats = [am.head_statistics(s, band=band) for s in sums]
    for st in stats:
        st["names"] = names
    return stats, first


def head_types(stats: list[dict]) -> dict:
    """Counts and (layer, head) lists of sink, local and periodic heads (thresholds: the module constants)."""
    out = {"sink": [], "local": [], "periodic": []}
    for layer, st in enumerate(stats):
        for head in range(st["entropy"].shape[0]):
            if st["sink"][head] >= SINK_HEAD:
                out["sink"].append([layer, head])
            if st["band"][head] >= LOCAL_HEAD:
                out["local"].append([layer, head])
            if st["periodic_lift"][head] >= PERIODIC_LIFT and st["periodic"][head] >= PERIODIC_MASS:
                out["periodic"].append([layer, head])
    return out


def chosen_heads(stats: list[dict], heads=None) -> list[tuple[str, int, int]]:
    """(why, layer, head) for the maps: the given "L:H" pairs, else the strongest sink, local, periodic and
    most spread (highest entropy) heads. Raises ValueError for a layer or head out of range."""
    num_layers, num_heads = len(stats), stats[0]["entropy"].shape[0]
    if heads:
        out = []
        for spec in heads:
            try:
                layer, head = (int(x) for x in spec.split(":"))
            except ValueError:
                raise ValueError(f"--heads entry {spec!r} must be LAYER:HEAD, e.g. 3:1") from None
            if not 0 <= layer < num_layers:
                raise ValueError(f"--heads {spec!r}: layer {layer} out of range; allowed 0..{num_layers - 1}")
            if not 0 <= head < num_heads:
                raise ValueError(f"--heads {spec!r}: head {head} out of range; allowed 0..{num_heads - 1}")
            out.append(("chosen", layer, head))
        return out
    table = {key: np.stack([st[key] for st in stats]) for key in ("sink", "band", "periodic", "entropy")}  # [L, N]
    picks = []
    for why, key in (("sink", "sink"), ("local", "band"), ("periodic", "periodic"), ("spread", "entropy")):
        layer, head = np.unravel_index(np.argmax(table[key]), table[key].shape)
        picks.append((why, int(layer), int(head)))
    return picks


def recommendations(stats: list[dict], thresholds, seq_len: int, *, causal: bool) -> list[dict]:
    """One recommendation per coverage threshold: the per-layer patterns, their mean density and the
    narrowest uniform window of at least that density."""
    names = stats[0]["names"]
    coverage = np.stack([st["coverage"].mean(-1) for st in stats])  # [L, M]: layer coverage = mean over heads
    density = np.stack([st["density"] for st in stats])  # [L, M]
    out = []
    for x in thresholds:
        per_layer = mc.recommend(coverage, density, names, x)
        total = float(np.mean([r["density"] for r in per_layer]))
        width, wd = mc.window_of_density(total, seq_len, causal=causal)
        out.append(
            {"threshold": x, "per_layer": per_layer, "density": total, "window": {"width": width, "density": wd}}
        )
    return out


def validate(model, recs: list[dict], candidates: dict, eval_batches, *, causal: bool) -> dict:
    """Held-out perplexity: dense, and per recommendation with its per-layer masks and with its uniform window
    (fills rec["perplexity"]). Returns the dense figures."""
    from effitrans.pruning import evaluate_lm

    num_layers = len(am.attention_modules(model))
    dense = evaluate_lm(model, eval_batches)
    logging.info("dense perplexity %.4f over %d tokens", dense["perplexity"], dense["tokens"])
    for rec in recs:
        masks = [candidates[r["pattern"]] for r in rec["per_layer"]]
        with mc.layer_masks(model, masks):
            ours = evaluate_lm(model, eval_batches)
        window = mc.window_mask(rec["window"]["width"], causal=causal)
        with mc.layer_masks(model, [window] * num_layers):
            uniform = evaluate_lm(model, eval_batches)
        rec["perplexity"] = {
            "dense": dense["perplexity"],
            "recommended": ours["perplexity"],
            "window": uniform["perplexity"],
        }
        rec["recommended_beats_window"] = ours["perplexity"] < uniform["perplexity"]
        logging.info("X=%s: %s", rec["threshold"], rec["perplexity"])
    return dense


def results_json(stats, recs, candidates, types, picks, meta: dict) -> dict:
    """The JSON document of a study (plain lists and floats)."""
    names = stats[0]["names"]
    layers = []
    for layer, st in enumerate(stats):
        heads = [
            {
                "head": h,
                **{key: round(float(st[key][h]), 5) for key in ("entropy", "distance", "sink", "band", "periodic")},
                "period": int(st["period"][h]),
                "periodic_lift": round(float(st["periodic_lift"][h]), 3),
                "coverage": {n: round(float(st["coverage"][m, h]), 5) for m, n in enumerate(names)},
            }
            for h in range(st["entropy"].shape[0])
        ]
        coverage = {n: round(float(st["coverage"][m].mean()), 5) for m, n in enumerate(names)}
        layers.append({"layer": layer, "coverage": coverage, "heads": heads})
    return {
        **meta,
        "patterns": {n: repr(m) for n, m in candidates.items()},
        "density": {n: round(float(stats[0]["density"][m]), 5) for m, n in enumerate(names)},
        "head_types": {k: {"count": len(v), "heads": v} for k, v in types.items()},
        "map_heads": [{"why": w, "layer": layer, "head": h} for w, layer, h in picks],
        "layers": layers,
        "recommendations": recs,
    }


def plot(out_dir: str, stats, recs, picks, first, *, map_len: int) -> list[str]:
    """maps.png, stats.png and coverage.png under out_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    q, k, supports = first
    t = min(map_len, q.shape[2])
    paths = []
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4), squeeze=False)
    for ax, (why, layer, head) in zip(axes[0], picks):
        # Causal rows < t see only keys < t; a non-causal layer's crop drops the mass on later keys.
        p = np.asarray(am.attention_probs(q[layer][:1, :t], k[layer][:1, :t], support=supports[layer]))[0, head]
        ax.imshow(np.maximum(p, 1e-4), norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="magma", interpolation="nearest")
        ax.set_xlim(-0.04 * t, t)  # room left of key 0, so a sink column is not hidden under the axis
        ax.set_title(f"{why if why == 'chosen' else 'most ' + why}: layer {layer} head {head}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "maps.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    panels = (("entropy", "entropy (nats)"), ("distance", "mean distance"), ("sink", "sink mass"))
    panels += (("band", "band mass"), ("periodic", "periodic mass"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.8))
    for ax, (key, title) in zip(axes, panels):
        im = ax.imshow(np.stack([st[key] for st in stats]), aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "stats.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cmap = plt.get_cmap("viridis")
    for layer, st in enumerate(stats):
        cov, dens = st["coverage"].mean(-1), st["density"]
        order = np.argsort(dens)
        frontier = np.maximum.accumulate(cov[order])  # best coverage at or below each density
        ax.step(dens[order], frontier, where="post", color=cmap(layer / max(1, len(stats) - 1)), lw=1)
    for rec in recs:
        ax.axhline(rec["threshold"], color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("mask density (kept / allowed pairs)")
    ax.set_ylabel("attention mass kept (best pattern)")
    ax.set_title("coverage vs density per layer (dark: first, light: last)", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "coverage.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def run(model, calib_rows, eval_batches, *, args, meta: dict) -> dict:
    """The whole study on a loaded model: analysis, recommendations, validation (when eval_batches is not
    None), results.json and the plots under args.out. Returns the results document."""
    thresholds = [mc.check_threshold(x) for x in args.coverage]
    seq_len = int(np.asarray(calib_rows).shape[1])
    causal = bool(am.attention_modules(model)[0].causal)
    candidates = mc.candidate_masks(seq_len, causal=causal)
    stats, first = analyse(
        model, calib_rows, candidates=candidates, block_q=args.block_q, sink=args.sink, band=args.band, batch=args.batch
    )
    picks = chosen_heads(stats, args.heads)
    recs = recommendations(stats, thresholds, seq_len, causal=causal)
    if eval_batches is not None:
        validate(model, recs, candidates, eval_batches, causal=causal)
    types = head_types(stats)
    doc = results_json(stats, recs, candidates, types, picks, {**meta, "seq_len": seq_len, "causal": causal})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    doc["plots"] = plot(args.out, stats, recs, picks, first, map_len=args.map_len)
    return doc


def _smollm2(args):
    """(model, calibration rows [P, T], held-out batches, meta) for the imported SmolLM2-135M on CPython docs."""
    from effitrans.data import load_corpus, split_documents, windows_batches
    from effitrans.models import import_gguf

    model, tok, cfg = import_gguf.load_with_config()
    corpus = load_corpus()
    train_idx, val_idx = split_documents(corpus, 0.05)

    def encode(indices):
        return np.concatenate([np.asarray(tok.encode(corpus.documents[i]).ids + [0], np.int32) for i in indices])

    rng = np.random.default_rng(args.seed)
    calib_stream = encode(sorted(rng.choice(train_idx, size=min(40, len(train_idx)), replace=False)))
    calib = windows_batches(calib_stream, args.passages, args.seq_len, batch=args.passages)[0]["inputs"]
    held_out = windows_batches(encode(val_idx), args.eval_windows, args.seq_len, batch=args.batch)
    meta = {"model": {"name": "SmolLM2-135M", "layers": cfg.num_layers, "heads": cfg.num_heads}}
    meta["data"] = {"calibration": "40 training documents", "held_out": f"{len(val_idx)} validation documents"}
    return model, calib, held_out, meta


def _trained(args):
    """(model, calibration rows, held-out batches or None, meta) for the trained run of --config / --workdir."""
    from effitrans.schema import load_config
    from effitrans.train.trainer import Trainer

    config = load_config(args.config)
    trainer = Trainer(config, args.workdir, verbose=False)
    state = trainer.restore_or_init(require_checkpoint=True)
    model = trainer.model_from(state["params"], state["model_state"])
    trainer.checkpointer.close()
    ds = trainer.dataset
    calib = ds.get_batch(0)["inputs"][: args.passages]
    held_out = None
    if ds.task == "lm":
        held_out = [b for _, b in zip(range(args.eval_windows), ds.eval_batches())]
    meta = {"model": {"name": config.model.name, "config": args.config, "workdir": args.workdir}}
    return model, calib, held_out, meta


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m effitrans.analysis attention", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=MODELS, help="an imported model")
    src.add_argument("--config", help="configs/*.py of a trained run (with --workdir)")
    p.add_argument("--workdir", help="the trained run's --workdir (with --config)")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json and the PNGs")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per row (--model)")
    p.add_argument("--passages", type=int, default=2, help="calibration rows whose attention is read")
    p.add_argument("--eval_windows", type=int, default=4, help="held-out rows (--model) / batches (--config)")
    p.add_argument("--batch", type=int, default=1, help="rows per forward pass")
    p.add_argument("--coverage", type=float, nargs="+", default=[0.9], help="thresholds X in (0, 1]")
    p.add_argument("--heads", nargs="*", default=None, help="LAYER:HEAD pairs to draw (default: chosen by type)")
    p.add_argument("--block_q", type=int, default=128, help="query rows per block when reading attention")
    p.add_argument("--sink", type=int, default=4, help="the first keys counted as sink tokens")
    p.add_argument("--band", type=int, default=8, help="offsets |i - j| counted as the diagonal band")
    p.add_argument("--map_len", type=int, default=128, help="rows and keys of the drawn maps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.config is not None and args.workdir is None:
        p.error("--config needs --workdir (the folder of the trained run)")
    for x in args.coverage:
        try:
            mc.check_threshold(x)
        except ValueError as e:
            p.error(f"--coverage: {e}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.set_verbosity(logging.INFO)
    t0 = time.time()
    model, calib, held_out, meta = _smollm2(args) if args.model else _trained(args)
    meta = {
        "command": "python -m effitrans.analysis attention " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "args": vars(args),
        "machine": machine_description(),
        **meta,
    }
    doc = run(model, calib, held_out, args=args, meta=meta)
    for rec in doc["recommendations"]:
        print(
            f"X={rec['threshold']}: density {rec['density']:.3f} (window {rec['window']['width']}: "
            f"{rec['window']['density']:.3f}); perplexity {rec.get('perplexity')}"
        )
    print(f"head types: { {k: v['count'] for k, v in doc['head_types'].items()} }; {time.time() - t0:.0f} s")
    print(f"wrote {os.path.join(args.out, 'results.json')} and {', '.join(doc['plots'])}")
    return 0
