"""Mixture-of-experts GLU feed-forward: routed fine-grained experts plus optional shared experts.

Routing (`route`): router logits [T, E] -> softmax (Switch, GShard, Mixtral) or sigmoid (DeepSeek-V3) scores;
each token picks its top-k experts by score + a selection bias (the DeepSeek-V3 auxiliary-loss-free balance
term, used for the choice only), optionally within its best `top_groups` of `num_groups` expert groups; the
combine weights are the chosen scores, optionally normalised to sum to one, times `route_scale`.

Three ways to run the chosen experts, one result (`tests/layers/test_moe.py`):
- `experts_reference`: every expert on every token, weighted by its combine weight (the loop reference);
- `experts_dropless`: assignments sorted by expert, grouped matmuls (no drops), either `jax.lax.ragged_dot`
  or `grouped="tiles"`: each expert's rows padded to whole tiles, one batched matmul over the tiles with each
  tile's expert weights. XLA:CPU (and CUDA XLA at JAX 0.10) lowers `ragged_dot` to one dense matmul over all
  experts, E times the routed work; the tiles pay only the padding (`grouped_matmul_for` picks per backend);
- `experts_capacity`: GShard dispatch/combine einsums into C slots per expert; assignments past an expert's
  capacity are dropped (first choices of every token are served before any second choice), and counted.

Load balance: `load_balancing_loss` (Switch: E x sum_e f_e P_e, 1 when balanced) is reported as an auxiliary
loss; `balance_bias_update` nudges the selection bias toward under-loaded experts (bias_e += rate x
sign(mean load - load_e)), proposed by the forward pass and committed by the training step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.glu import ACTIVATIONS, GLUFeedForward
from effitrans.layers.params import StateVariable, fan_in_normal, init_param, propose_update, report
from effitrans.schema import Key, boolean, float_at_least, int_at_least, int_or_int_list, is_int, one_of

GATINGS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity", "dense")
GROUPED_MATMULS = ("auto", "ragged_dot", "tiles")


def layer_indices(v):
    ok = v is None or (isinstance(v, (list, tuple)) and all(is_int(x) and x >= 0 for x in v))
    return None if ok else "None (every layer) or a list of layer indices >= 0"


# config.model.moe (present: the layers it names use MoEFeedForward; absent: every layer is a dense GLU).
MOE_KEYS = {
    "layers": Key(None, layer_indices, "layers with an MoE feed-forward; None = every layer", object),
    "num_experts": Key(
        8, int_or_int_list, "routed experts E: an int, or one per MoE layer in layer order (pruned experts)", object
    ),
    "expert_width": Key(96, int_at_least(1), "GLU width F of each expert (and of each shared expert)"),
    "top_k": Key(2, int_at_least(1), "routed experts per token K"),
    "num_shared_experts": Key(0, int_at_least(0), "experts every token uses (one GLU of width n x expert_width)"),
    "gating": Key("softmax", one_of(*GATINGS), "softmax (Switch/Mixtral) | sigmoid (DeepSeek-V3)"),
    "normalize_top_k": Key(True, boolean, "combine weights of the K chosen experts sum to one"),
    "route_scale": Key(1.0, float_at_least(0.0, strict=True), "combine weights x this (DeepSeek-V3: 2.5)"),
    "num_groups": Key(1, int_at_least(1), "expert groups for group-limited routing (must divide num_experts)"),
    "top_groups": Key(1, int_at_least(1), "groups a token may route into (<= num_groups)"),
    "dispatch": Key(
        "dropless", one_of(*DISPATCHES), "dropless (grouped matmuls) | capacity (GShard) | dense (reference)"
    ),
    "grouped_matmul": Key(
        "auto",
        one_of(*GROUPED_MATMULS),
        "dropless matmuls: auto (ragged_dot on TPU, tiles elsewhere) | ragged_dot | tiles",
    ),
    "capacity_factor": Key(1.25, float_at_least(0.0, strict=True), "capacity: slots per expert = cf x T x K / E"),
    "aux_loss_weight": Key(0.01, float_at_least(0.0), "weight of the Switch load-balancing loss; 0 = off"),
    "bias_update_rate": Key(0.0, float_at_least(0.0), "aux-loss-free selection-bias step per train step; 0 = off"),
}


def moe_problems(num_experts, top_k, num_groups=1, top_groups=1, capacity_factor=1.0) -> list:
    """[(key, message)] for values that do not fit together (empty when fine); messages start with the key."""
    out = []
    if not (is_int(num_experts) and num_experts >= 1):
        out.append(("num_experts", f"num_experts={num_experts!r} is not allowed: expected an int >= 1"))
        return out
    if not (is_int(top_k) and 1 <= top_k <= num_experts):
        out.append(("top_k", f"top_k={top_k!r} is not allowed: expected an int in [1, num_experts={num_experts}]"))
    if not (is_int(num_groups) and num_groups >= 1 and num_experts % num_groups == 0):
        divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
        out.append(("num_groups", f"num_groups={num_groups!r} must divide num_experts={num_experts} ({divisors})"))
    elif not (is_int(top_groups) and 1 <= top_groups <= num_groups):
        out.append(("top_groups", f"top_groups={top_groups!r} is not allowed: expected an int in [1, {num_groups}]"))
    elif is_int(top_k) and top_k > top_groups * (num_experts // num_groups):
        out.append(
            (
                "top_k",
                f"top_k={top_k} exceeds the {top_groups * (num_experts // num_groups)} experts in top_groups="
                f"{top_groups} groups of {num_experts // num_groups}",
            )
        )
    if not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
        out.append(("capacity_factor", f"capacity_factor={capacity_factor!r} is not allowed: expected a number > 0"))
    return out


# ---- routing -------------------------------------------------------------------------------------------


class Routing(NamedTuple):
    """experts int32 [T, K] (chosen, best first); weights float32 [T, K] (combine); probs float32 [T, E] (the
    router's distribution: softmax, or the sigmoid scores normalised per token; for the aux loss and entropy)."""

    experts: jax.Array
    weights: jax.Array
    probs: jax.Array


def route(
    logits,
    *,
    top_k: int,
    gating: str = "softmax",
    bias=None,
    normalize: bool = True,
    scale: float = 1.0,
    num_groups: int = 1,
    top_groups: int = 1,
) -> Routing:
    """logits [T, E] -> Routing. bias [E] shifts the choice only (not the weights). With num_groups > 1 a token
    keeps its top_groups groups by the sum of each group's two best selection scores (DeepSeek-V3)."""
    if gating not in GATINGS:
        raise ValueError(f"gating={gating!r} is not one of {list(GATINGS)}")
    logits = logits.astype(jnp.float32)
    num_tokens, num_experts = logits.shape
    scores = jax.nn.softmax(logits, -1) if gating == "softmax" else jax.nn.sigmoid(logits)  # [T, E]
    select = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    if num_groups > 1:
        grouped = select.reshape(num_tokens, num_groups, num_experts // num_groups)  # [T, G, E/G]
        group_score = jnp.sum(jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0], -1)  # [T, G]
        _, best = jax.lax.top_k(group_score, top_groups)  # [T, top_groups]
        kept = jnp.sum(jax.nn.one_hot(best, num_groups, dtype=jnp.bool_), 1)  # [T, G]
        select = jnp.where(jnp.repeat(kept, num_experts // num_groups, axis=1), select, -jnp.inf)
    _, experts = jax.lax.top_k(jax.lax.stop_gradient(select), top_k)  # [T, K]
    weights = jnp.take_along_axis(scores, experts, -1)  # [T, K]
    if normalize:
        weights = weights / (jnp.sum(weights, -1, keepdims=True) + 1e-20)
    probs = scores if gating == "softmax" else scores / jnp.sum(scores, -1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights * scale, probs)


def _token_weights(valid, num_tokens: int):
    """valid bool [T] or None (every token) -> float32 [T] 1/0 and its sum (at least 1, so means stay finite)."""
    w = jnp.ones((num_tokens,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    return w, jnp.maximum(jnp.sum(w), 1.0)


def expert_counts(experts, num_experts: int, valid=None):
    """experts int [T, K] -> assignments per expert int32 [E] (before any capacity drop); valid bool [T] counts
    only those tokens (padding routes nowhere)."""
    num_tokens, top_k = experts.shape
    w = None if valid is None else jnp.repeat(valid.astype(jnp.int32), top_k)  # [T*K]
    return jnp.bincount(experts.reshape(-1), weights=w, length=num_experts).astype(jnp.int32)


def load_balancing_loss(probs, experts, valid=None):
    """Switch Transformer auxiliary loss E x sum_e f_e x P_e: f_e the share of the T x K assignments expert e
    got, P_e its mean router probability, both over the valid tokens (bool [T]; None = all). 1 when both are
    uniform; gradients reach the router through P."""
    num_tokens, num_experts = probs.shape
    w, n = _token_weights(valid, num_tokens)
    f = expert_counts(experts, num_experts, valid).astype(jnp.float32) / (n * experts.shape[1])  # [E]
    return num_experts * jnp.sum(f * (jnp.sum(probs * w[:, None], 0) / n))


def router_entropy(probs, valid=None):
    """Mean over the valid tokens (bool [T]; None = all) of the entropy (nats) of probs [T, E]."""
    w, n = _token_weights(valid, probs.shape[0])
    return jnp.sum(w * -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), -1)) / n


def balance_bias_update(bias, counts, rate: float):
    """DeepSeek-V3's auxiliary-loss-free step: bias [E] + rate x sign(mean(counts) - counts)."""
    counts = counts.astype(jnp.float32)
    return bias + rate * jnp.sign(jnp.mean(counts) - counts)


# ---- the experts: one reference, two dispatch paths -----------------------------------------------------


def _glu(x, w_gate, w_up, w_down, activation):
    """x [T, D], weights of one expert [D, F], [D, F], [F, D] -> [T, D]."""
    h = ACTIVATIONS[activation](x @ w_gate) * (x @ w_up)  # [T, F]
    return h @ w_down


def experts_reference(x, experts, weights, w_gate, w_up, w_down, activation: str = "silu"):
    """Every expert on every token: y[t] = sum_e (sum_k weights[t, k] [experts[t, k] == e]) glu_e(x[t]).
    x [T, D]; experts/weights [T, K]; w_gate/w_up [E, D, F]; w_down [E, F, D] -> [T, D]."""
    y = jnp.zeros_like(x)
    for e in range(w_gate.shape[0]):
        gate = jnp.sum(jnp.where(experts == e, weights, 0.0), -1).astype(x.dtype)  # [T]
        y = y + gate[:, None] * _glu(x, w_gate[e], w_up[e], w_down[e], activation)
    return y


def grouped_matmul_for(grouped: str, backend: str | None = None) -> str:
    """ "auto" -> "ragged_dot" on TPU (a native grouped matmul), "tiles" on CPU and GPU, where XLA lowers
    ragged_dot to a dense matmul over every expert; other values pass through."""
    if grouped not in GROUPED_MATMULS:
        raise ValueError(f"grouped_matmul={grouped!r} is not one of {list(GROUPED_MATMULS)}")
    if grouped != "auto":
        return grouped
    return "ragged_dot" if (backend or jax.default_backend()) == "tpu" else "tiles"


def tile_rows(num_assignments: int, num_experts: int) -> int:
    """Rows per tile of the tiled grouped matmul: half an expert's mean rows as a power of two in [8, 256]
    (larger tiles run faster matmuls but pad each expert by up to tile - 1 rows: 256 measured best on the CPU
    at 768 rows per expert: the layer breakdown of `python -m effitrans.bench train`)."""
    half_mean = max(num_assignments / (2 * num_experts), 1.0)
    return int(min(256, max(8, 2 ** math.floor(math.log2(half_mean)))))


def _glu_ragged(x, token_of, order, sizes, w_gate, w_up, w_down, activation):
    """ragged_dot groups over the sorted assignments -> [N, D] in sorted order."""
    xs = x[token_of[order]]  # [N, D]
    h = ACTIVATIONS[activation](jax.lax.ragged_dot(xs, w_gate, sizes)) * jax.lax.ragged_dot(xs, w_up, sizes)
    return jax.lax.ragged_dot(h, w_down, sizes)  # [N, D]


def _glu_tiles(x, token_of, order, flat, sizes, w_gate, w_up, w_down, activation, tile):
    """Each expert's sorted assignments padded to whole tiles of `tile` rows (static bound: N + E (tile - 1)
    rows); one batched matmul over the tiles, each with its expert's weights -> [N, D] in sorted order.
    Padding rows read a zero row and are never read back; unused tiles at the end get expert E - 1."""
    num_assignments, num_experts, dim = flat.shape[0], w_gate.shape[0], x.shape[-1]
    padded = (sizes + tile - 1) // tile * tile  # [E] rows of each expert's tiles
    pad_end = jnp.cumsum(padded)
    start = jnp.cumsum(sizes) - sizes  # [E] first sorted row of each expert
    rows = -(-(num_assignments + num_experts * (tile - 1)) // tile) * tile
    expert = flat[order]  # [N] expert of each sorted assignment
    row = pad_end[expert] - padded[expert] + jnp.arange(num_assignments) - start[expert]  # [N] padded row
    src = jnp.full((rows,), x.shape[0], jnp.int32).at[row].set(token_of[order])  # [R] token; T = padding
    xp = jnp.concatenate([x, jnp.zeros((1, dim), x.dtype)])[src].reshape(rows // tile, tile, dim)  # [n, b, D]
    tile_starts = jnp.arange(rows // tile) * tile
    tile_expert = jnp.minimum(jnp.searchsorted(pad_end, tile_starts, side="right"), num_experts - 1)  # [n]
    gate, up = (jnp.einsum("nbD,nDF->nbF", xp, w[tile_expert]) for w in (w_gate, w_up))
    yp = jnp.einsum("nbF,nFD->nbD", ACTIVATIONS[activation](gate) * up, w_down[tile_expert])  # [n, b, D]
    return yp.reshape(rows, dim)[row]  # [N, D]


def experts_dropless(
    x,
    experts,
    weights,
    w_gate,
    w_up,
    w_down,
    activation: str = "silu",
    *,
    grouped: str = "auto",
    tile: int | None = None,
    per_assignment=False,
):
    """The T x K assignments sorted by expert, each expert's rows one group of a grouped matmul. Same
    arguments and result as experts_reference; the work is T x K rows (plus tile padding), not T x E.
    grouped: "ragged_dot" | "tiles" | "auto" (grouped_matmul_for); tile: rows per tile (None: tile_rows).
    per_assignment: also return each assignment's weighted expert output [T, K, D] (what expert
    experts[t, k] adds to token t)."""
    num_tokens, top_k = experts.shape
    num_experts = w_gate.shape[0]
    flat = experts.reshape(-1)  # [T*K]
    order = jnp.argsort(flat, stable=True)  # [T*K] assignment index, grouped by expert
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
    token_of = jnp.arange(flat.shape[0], dtype=jnp.int32) // top_k  # [T*K]
    w = (w_gate, w_up, w_down)
    if grouped_matmul_for(grouped) == "tiles":
        tile = tile_rows(flat.shape[0], num_experts) if tile is None else tile
        if not (isinstance(tile, int) and tile >= 1):
            raise ValueError(f"tile={tile!r} is not allowed: expected an int >= 1 (rows per tile)")
        ys = _glu_tiles(x, token_of, order, flat, sizes, *w, activation, tile)
    else:
        ys = _glu_ragged(x, token_of, order, sizes, *w, activation)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    ys = ys[inverse].reshape(num_tokens, top_k, -1)  # [T, K, D] back in assignment order
    y = jnp.einsum("TKD,TK->TD", ys, weights.astype(x.dtype))
    return (y, ys * weights[..., None].astype(x.dtype)) if per_assignment else y


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor x T x K / E), at most T (a token picks an expert once)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor={capacity_factor!r} is not allowed: expected a number > 0")
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def capacity_slots(experts, num_experts: int, capacity: int, valid=None):
    """experts [T, K] -> (slot int32 [T, K]: the assignment's place in its expert's queue, keep bool [T, K]:
    slot < capacity). The queue serves every token's first choice (in token order), then every second one.
    Tokens with valid False (bool [T], padding) take no slot and are not kept."""
    num_tokens, top_k = experts.shape
    onehot = jax.nn.one_hot(experts.T.reshape(-1), num_experts, dtype=jnp.int32)  # [K*T, E], choice-major
    if valid is not None:
        onehot = onehot * jnp.tile(valid.astype(jnp.int32), top_k)[:, None]
    position = jnp.cumsum(onehot, 0) - 1  # [K*T, E]
    slot = jnp.sum(position * onehot, -1).reshape(top_k, num_tokens).T  # [T, K]
    keep = slot < capacity
    return slot, keep if valid is None else keep & valid[:, None]


def experts_capacity(x, experts, weights, w_gate, w_up, w_down, activation: str = "silu", *, capacity: int, valid=None):
    """GShard dispatch/combine einsums over [E, C] slots; assignments with slot >= capacity are dropped.
    Same arguments as experts_reference (+ capacity C; valid bool [T]: padding tokens take no slot, give zero
    and are not counted as dropped) -> (y [T, D], dropped assignments int32)."""
    num_experts = w_gate.shape[0]
    slot, keep = capacity_slots(experts, num_experts, capacity, valid)
    to_expert = jax.nn.one_hot(experts, num_experts, dtype=x.dtype)  # [T, K, E]
    to_slot = jax.nn.one_hot(jnp.where(keep, slot, capacity), capacity, dtype=x.dtype)  # [T, K, C]; dropped: 0
    dispatch = jnp.einsum("TKE,TKC->TEC", to_expert, to_slot)  # [T, E, C] 0/1
    combine = jnp.einsum("TKE,TKC,TK->TEC", to_expert, to_slot, weights.astype(x.dtype))
    xe = jnp.einsum("TEC,TD->ECD", dispatch, x)  # [E, C, D]
    h = ACTIVATIONS[activation](jnp.einsum("ECD,EDF->ECF", xe, w_gate)) * jnp.einsum("ECD,EDF->ECF", xe, w_up)
    ye = jnp.einsum("ECF,EFD->ECD", h, w_down)  # [E, C, D]
    y = jnp.einsum("TEC,ECD->TD", combine, ye)
    dropped = ~keep if valid is None else ~keep & valid[:, None]
    return y, jnp.sum(dropped).astype(jnp.int32)


# ---- the module ------------------------------------------------------------------------------------------


class ExpertStatistics(nnx.Variable):
    """Per-expert sums of one forward pass, written only while the module's `record_experts` is set
    (effitrans.pruning.expert_statistics): {"load": assignments [E], "output_norm": sum of ||weighted expert
    output||_2 over its assignments [E], "tokens": real tokens []}."""


def expert_statistics_of(x, r: Routing, weights, w_gate, w_up, w_down, activation: str, valid=None) -> dict:
    """The ExpertStatistics sums for tokens x [T, D] routed by r (weights [T, K] with padding zeroed)."""
    num_experts = w_gate.shape[0]
    _, contrib = experts_dropless(x, r.experts, weights, w_gate, w_up, w_down, activation, per_assignment=True)
    norms = jnp.linalg.norm(contrib.astype(jnp.float32), axis=-1)  # [T, K]
    out_norm = jnp.zeros((num_experts,), jnp.float32).at[r.experts.reshape(-1)].add(norms.reshape(-1))
    tokens = x.shape[0] if valid is None else jnp.sum(valid)
    return {"load": expert_counts(r.experts, num_experts, valid), "output_norm": out_norm, "tokens": tokens}


class MoEFeedForward(nnx.Module):
    """x [B, T, D] -> [B, T, D]. Weights: router [D, E]; gate/up [E, D, F]; down [E, F, D] (logical axis
    "experts" on E); `shared` a GLUFeedForward of width num_shared_experts x F (or None); `selection_bias` [E]
    a StateVariable. Each call reports router metrics (and the weighted aux loss) with `report` and, with
    bias_update_rate > 0, proposes the next selection bias."""

    def __init__(
        self,
        dim: int,
        *,
        num_experts: int,
        expert_width: int,
        top_k: int,
        num_shared_experts: int = 0,
        gating: str = "softmax",
        normalize_top_k: bool = True,
        route_scale: float = 1.0,
        num_groups: int = 1,
        top_groups: int = 1,
        dispatch: str = "dropless",
        grouped_matmul: str = "auto",
        capacity_factor: float = 1.25,
        aux_loss_weight: float = 0.0,
        bias_update_rate: float = 0.0,
        activation: str = "silu",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        for _, msg in moe_problems(num_experts, top_k, num_groups, top_groups, capacity_factor):
            raise ValueError(msg)
        for name, v, allowed in (
            ("gating", gating, GATINGS),
            ("dispatch", dispatch, DISPATCHES),
            ("grouped_matmul", grouped_matmul, GROUPED_MATMULS),
        ):
            if v not in allowed:
                raise ValueError(f"{name}={v!r} is not one of {list(allowed)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not (is_int(expert_width) and expert_width >= 1):
            raise ValueError(f"expert_width={expert_width!r} is not allowed: expected an int >= 1")
        self.num_experts, self.top_k, self.gating, self.normalize_top_k = num_experts, top_k, gating, normalize_top_k
        self.route_scale, self.num_groups, self.top_groups = route_scale, num_groups, top_groups
        self.dispatch, self.capacity_factor, self.activation, self.dtype = dispatch, capacity_factor, activation, dtype
        self.aux_loss_weight, self.bias_update_rate = aux_loss_weight, bias_update_rate
        self.grouped_matmul = grouped_matmul
        shape = (num_experts, dim, expert_width)
        init = fan_in_normal((1,), batch_axes=(0,))
        self.router = init_param(rngs, (dim, num_experts), ("embed", None), fan_in_normal())
        self.gate = init_param(rngs, shape, ("experts", "embed", "mlp"), init)
        self.up = init_param(rngs, shape, ("experts", "embed", "mlp"), init)
        self.down = init_param(rngs, (num_experts, expert_width, dim), ("experts", "mlp", "embed"), init)
        self.shared = (
            GLUFeedForward(dim, num_shared_experts * expert_width, activation=activation, rngs=rngs, dtype=dtype)
            if num_shared_experts
            else None
        )
        self.selection_bias = StateVariable(jnp.zeros((num_experts,), jnp.float32), logical_axes=("experts",))
        self.record_experts = False  # set by effitrans.pruning.expert_statistics

    def routing(self, x) -> Routing:
        """x [T, D] -> Routing (router in float32)."""
        logits = jnp.einsum("TD,DE->TE", x.astype(jnp.float32), self.router[...])  # [T, E]
        return route(
            logits,
            top_k=self.top_k,
            gating=self.gating,
            bias=self.selection_bias[...],
            normalize=self.normalize_top_k,
            scale=self.route_scale,
            num_groups=self.num_groups,
            top_groups=self.top_groups,
        )

    def __call__(self, x, *, valid=None, decode: bool = False):
        """x [B, T, D] -> [B, T, D]. valid bool [B, T] (None = every token): padding tokens get no routed expert
        (zero output from them), take no capacity slot and are left out of loads, aux loss, entropy and the bias
        update. decode (a serving step, possibly inside a scan): no reports, no proposal."""
        shape = x.shape
        xt = x.reshape(-1, shape[-1]).astype(self.dtype)  # [T, D], T = all tokens of the batch
        v = None if valid is None else jnp.broadcast_to(valid, shape[:-1]).reshape(-1).astype(jnp.bool_)  # [T]
        r = self.routing(xt)
        weights = r.weights if v is None else jnp.where(v[:, None], r.weights, 0.0)  # [T, K]
        w = tuple(p[...].astype(self.dtype) for p in (self.gate, self.up, self.down))
        dropped = jnp.zeros((), jnp.int32)
        if self.dispatch == "dense":
            y = experts_reference(xt, r.experts, weights, *w, self.activation)
        elif self.dispatch == "dropless":
            y = experts_dropless(xt, r.experts, weights, *w, self.activation, grouped=self.grouped_matmul)
        else:
            capacity = expert_capacity(xt.shape[0], self.top_k, self.num_experts, self.capacity_factor)
            y, dropped = experts_capacity(xt, r.experts, weights, *w, self.activation, capacity=capacity, valid=v)
        if self.record_experts:
            self.expert_stats = ExpertStatistics(expert_statistics_of(xt, r, weights, *w, self.activation, v))
        y = y.reshape(shape)
        if self.shared is not None:
            y = y + self.shared(x)
        if decode:
            return y.astype(self.dtype)
        counts = expert_counts(r.experts, self.num_experts, v)  # [E]
        aux = load_balancing_loss(r.probs, r.experts, v)
        report(self, "moe_aux_loss", aux)
        if self.aux_loss_weight > 0:
            report(self, "moe_weighted_aux_loss", self.aux_loss_weight * aux, loss=True)
        load = jnp.max(counts) / jnp.maximum(jnp.mean(counts.astype(jnp.float32)), 1e-9)
        report(self, "moe_load_max_over_mean", load, reduce="max")
        assignments = r.experts.size if v is None else jnp.maximum(jnp.sum(v) * self.top_k, 1)
        report(self, "moe_dropped_share", dropped / assignments)
        report(self, "moe_router_entropy", router_entropy(r.probs, v))
        if self.bias_update_rate > 0:
            new_bias = balance_bias_update(self.selection_bias[...], counts, self.bias_update_rate)
            propose_update(self, "selection_bias", new_bias)
        return y.astype(self.dtype)
