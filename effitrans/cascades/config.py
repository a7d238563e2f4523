"""The `cascade` config group: which cascades a cascade study runs and how (docs/cascades.md).

    config.cascade = defaults.cascade(stages=[[1, 32], [4, 64]], scorer="max_prob", routers=["knn"])

Stages are the models of the chain, cheapest first (each [num_layers, d_model] of an encoder classifier);
the last one carries the early exits. The sequential cascade (FrugalGPT) runs them in order and accepts a
stage's answer when its scorer's confidence is above the stage's threshold (fixed, or chosen on the dev split
as the cheapest meeting the quality target); routers (RouteLLM) send each query to the first or the last
stage; early exit runs the last stage with exits after `exit_layers`, deciding by each of `exit_measures`,
its threshold calibrated by `calibration` for an inconsistency `delta` with probability 1 - `epsilon`.

Imports only the schema and the exit heads' names (a leaf module).
"""

from __future__ import annotations

from effitrans.cascades.exit_heads import MEASURES
from effitrans.schema import ConfigError, Key, float_in, int_at_least, is_int, is_number, one_of, validate

ROUTERS = ("embedding_classifier", "knn")  # fitted on which stage was right on the dev split
# A stage's confidence in its own answer: from its logits, or "trained" (FrugalGPT's scorer: a logistic regression
# on the stage's pooled embedding and probabilities, fitted on the dev split to predict that the stage is right).
SCORERS = ("max_prob", "margin", "entropy", "trained")
CALIBRATIONS = ("ltt", "empirical")


def _stages(v):
    ok = (
        isinstance(v, (list, tuple))
        and all(isinstance(s, (list, tuple)) and len(s) == 2 and all(is_int(x) and x >= 1 for x in s) for s in v)
        and len(v) > 0
    )
    return None if ok else "a list of [num_layers, d_model] pairs of ints >= 1, cheapest first"


def _names(allowed):
    def check(v):
        ok = isinstance(v, (list, tuple)) and v and all(x in allowed for x in v) and len(set(v)) == len(v)
        return None if ok else f"a non-empty list of distinct names from {list(allowed)}"

    return check


def _thresholds(v):
    ok = v is None or (isinstance(v, (list, tuple)) and all(is_number(t) and 0 <= t <= 1 for t in v))
    return None if ok else "None (chosen on the dev split) or a list of numbers in [0, 1], one per stage but the last"


def _open_unit(v):
    return None if is_number(v) and 0 < v < 1 else "a number in (0, 1)"


def _layers(v):
    ok = v is None or (isinstance(v, (list, tuple)) and v and all(is_int(x) and x >= 1 for x in v))
    return None if ok else "None (after every layer but the last) or a non-empty list of ints >= 1"


CASCADE_KEYS = {
    "stages": Key([[1, 32], [4, 64]], _stages, "the chain's models, cheapest first: [num_layers, d_model]", object),
    "exit_layers": Key(None, _layers, "exits of the last stage (None: after each of its layers but the last)", object),
    "exit_measures": Key(list(MEASURES), _names(MEASURES), "early exit: the confidence measures compared", object),
    "scorer": Key("max_prob", one_of(*SCORERS), "sequential: a stage's confidence in its own answer"),
    "thresholds": Key(None, _thresholds, "sequential: accept stage s when its score > thresholds[s]", object),
    "quality_gap": Key(0.005, float_in(0.0, 1.0), "sequential: dev target = the last stage's quality - this"),
    "routers": Key(list(ROUTERS), _names(ROUTERS), "routing: routers between the first and the last stage", object),
    "knn_k": Key(32, int_at_least(1), "routing: neighbours of the knn router"),
    "calibration": Key("ltt", one_of(*CALIBRATIONS), "early exit: ltt (Learn-then-Test) | empirical"),
    "delta": Key(0.02, _open_unit, "early exit: allowed inconsistency with the last layer"),
    "epsilon": Key(0.1, _open_unit, "early exit (ltt): allowed probability that the bound fails"),
}


def check_cascade_config(cfg, prefix: str = "config.cascade") -> None:
    """The keys (validate) and their relations: >= 2 stages, one threshold per stage but the last, exits
    inside the last stage."""
    validate(cfg, CASCADE_KEYS, prefix)
    stages = [list(s) for s in cfg.get("stages", CASCADE_KEYS["stages"].default)]
    if len(stages) < 2:
        raise ConfigError(
            f"{prefix}.stages={stages} is a cascade of {len(stages)} model; a cascade needs at least 2 (cheapest first)"
        )
    thresholds = cfg.get("thresholds")
    if thresholds is not None and len(thresholds) != len(stages) - 1:
        raise ConfigError(
            f"{prefix}.thresholds={list(thresholds)} has {len(thresholds)} entries; expected one per stage but the "
            f"last ({len(stages) - 1} for {len(stages)} stages)"
        )
    last = stages[-1][0]
    layers = cfg.get("exit_layers")
    if last < 2 and layers is None:
        raise ConfigError(f"{prefix}.stages={stages}: the last stage has 1 layer, so it has no room for an exit")
    if layers is not None:
        layers = list(layers)
        if sorted(set(layers)) != layers or layers[-1] >= last:
            raise ConfigError(
                f"{prefix}.exit_layers={layers} must be strictly increasing layer counts in 1..{last - 1} (the last "
                f"stage has {last} layers)"
            )


def exit_layers_of(cfg) -> list[int]:
    """The last stage's exit layers: cascade.exit_layers, or after each of its layers but the last."""
    layers = cfg.get("exit_layers")
    return list(layers) if layers is not None else list(range(1, cfg.stages[-1][0]))
