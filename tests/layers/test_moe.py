"""Mixture-of-experts feed-forward: the dropless (ragged_dot or tiled grouped matmuls) and capacity (GShard
einsum) paths equal the loop reference in value and gradients (ties, empty experts and dropped assignments
included), routing rules, the load balancing terms, the module's reports and state proposals, and the
argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effitrans import defaults
from effitrans.layers.moe import (
    MoEFeedForward,
    balance_bias_update,
    capacity_slots,
    expert_capacity,
    expert_counts,
    experts_capacity,
    experts_dropless,
    experts_reference,
    grouped_matmul_for,
    load_balancing_loss,
    route,
    router_entropy,
    tile_rows,
)
from effitrans.layers.params import StateVariable, commit_updates, pop_reports
from effitrans.train import partitioning

T, D, E, F, K = 24, 8, 5, 4, 2


def _weights(seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (T, D))
    router = jax.random.normal(ks[1], (D, E))
    w = (
        jax.random.normal(ks[2], (E, D, F)) / D**0.5,
        jax.random.normal(ks[3], (E, D, F)) / D**0.5,
        jax.random.normal(ks[4], (E, F, D)) / F**0.5,
    )
    return x, router, w


def _loss(path, keep=None, **route_kw):
    """sum(sin(y)) of `path` as a function of (x, router, expert weights), routing included."""

    def f(x, router, w):
        r = route(x @ router, top_k=K, **route_kw)
        weights = r.weights if keep is None else r.weights * keep
        y = path(x, r.experts, weights, *w)
        y = y[0] if isinstance(y, tuple) else y
        return jnp.sum(jnp.sin(y) * jnp.arange(1, D + 1))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))


def _assert_same(a, b, tol=2e-5):
    (va, ga), (vb, gb) = a, b
    np.testing.assert_allclose(va, vb, rtol=tol, atol=tol)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def test_dispatch_paths_equal_the_reference_forward_and_gradients_with_top_k_ties():
    x, router, w = _weights(1)
    router = router.at[:, 1:3].set(router[:, :1])  # experts 0-2 get equal scores for every token
    tied = np.asarray(route(x @ router, top_k=K).weights)
    assert np.isclose(tied[:, 0], tied[:, 1]).sum() > T // 4  # tokens really chose between tied experts
    counts = np.bincount(np.asarray(route(x @ router, top_k=K).experts).ravel(), minlength=E)
    assert counts.min() == 0 < counts.max()  # an empty group, and groups of other sizes
    ref = _loss(experts_reference)(x, router, w)
    # Tiles of 3 rows: groups end mid-tile (the slow test below adds ragged_dot and 64-row tiles).
    _assert_same(_loss(functools.partial(experts_dropless, grouped="tiles", tile=3))(x, router, w), ref)
    # Capacity T: no assignment can be dropped.
    _assert_same(_loss(lambda *a: experts_capacity(*a, capacity=T))(x, router, w), ref)


@pytest.mark.slow  # two more compiles of the tied case above
@pytest.mark.parametrize("grouped, tile", [("ragged_dot", None), ("tiles", 64)])
def test_ragged_dot_and_whole_group_tiles_equal_the_reference(grouped, tile):
    # ragged_dot, and tiles of 64 rows: one tile holds a whole group, mostly padding.
    x, router, w = _weights(1)
    router = router.at[:, 1:3].set(router[:, :1])
    ref = _loss(experts_reference)(x, router, w)
    _assert_same(_loss(functools.partial(experts_dropless, grouped=grouped, tile=tile))(x, router, w), ref)


def _queue_keep(experts: np.ndarray, capacity: int) -> np.ndarray:
    """The GShard queue written as a loop: first choices in token order, then second choices."""
    taken = np.zeros(E, int)
    keep = np.zeros(experts.shape, bool)
    for k in range(experts.shape[1]):
        for t in range(experts.shape[0]):
            e = experts[t, k]
            keep[t, k] = taken[e] < capacity
            taken[e] += 1
    return keep


@pytest.mark.slow  # ~5 s of compiles; the dispatch test keeps the capacity path in the default run
def test_capacity_path_drops_past_capacity_and_equals_the_reference_without_the_dropped():
    x, router, w = _weights(2)
    router = router.at[:, 0].add(2.0)  # skew: expert 0 is overfull
    capacity = expert_capacity(T, K, E, capacity_factor=0.75)
    assert capacity == 8  # ceil(0.75 x 24 x 2 / 5)
    r = route(x @ router, top_k=K, gating="sigmoid")
    keep = _queue_keep(np.asarray(r.experts), capacity)
    assert 0 < (~keep).sum() < keep.size
    y, dropped = experts_capacity(x, r.experts, r.weights, *w, capacity=capacity)
    assert int(dropped) == int((~keep).sum())
    np.testing.assert_array_equal(capacity_slots(r.experts, E, capacity)[1], keep)
    ref = _loss(experts_reference, keep=jnp.asarray(keep, jnp.float32), gating="sigmoid")(x, router, w)
    _assert_same(_loss(lambda *a: experts_capacity(*a, capacity=capacity), gating="sigmoid")(x, router, w), ref)


def test_routing_rules():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    r = route(logits, top_k=2, normalize=False)  # Switch/GShard-style: raw softmax scores
    np.testing.assert_array_equal(r.experts, [[0, 1], [2, 3]])
    np.testing.assert_allclose(r.weights, jnp.take_along_axis(jax.nn.softmax(logits), r.experts, -1), rtol=1e-6)
    r = route(logits, top_k=2, gating="sigmoid", scale=2.5)  # DeepSeek-V3: normalised sigmoid scores x scale
    np.testing.assert_allclose(r.weights.sum(-1), [2.5, 2.5], rtol=1e-6)
    r = route(logits, top_k=1, bias=jnp.array([0.0, 0.0, 0.0, 1.0]))  # the bias moves the choice only
    np.testing.assert_array_equal(r.experts[:, 0], [3, 3])
    np.testing.assert_allclose(r.weights[:, 0], [1.0, 1.0])  # normalised top-1
    # Groups {0, 1}, {2, 3}: with one group allowed, the token keeps to group 0 (top-2 sum 1.58 vs 1.23)
    # though expert 3 beats expert 1.
    g = jnp.array([[3.0, 0.5, 0.0, 1.0]])
    np.testing.assert_array_equal(route(g, top_k=2, gating="sigmoid").experts, [[0, 3]])
    np.testing.assert_array_equal(route(g, top_k=2, gating="sigmoid", num_groups=2).experts, [[0, 1]])


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_skewed():
    probs = jnp.full((8, 4), 0.25)
    experts = jnp.array([[0, 1], [2, 3]] * 4)
    assert float(load_balancing_loss(probs, experts)) == pytest.approx(1.0)
    skewed = jax.nn.softmax(jnp.array([4.0, 0.0, 0.0, 0.0]) * jnp.ones((8, 1)))
    assert float(load_balancing_loss(skewed, jnp.array([[0, 1]] * 8))) > 1.5


def test_bias_update_moves_a_skewed_router_toward_balance():
    x = jax.random.normal(jax.random.key(3), (512, D))
    logits = 0.3 * x @ jax.random.normal(jax.random.key(4), (D, 8)) + jnp.linspace(3.0, 0.0, 8)  # skewed to low ids
    bias = jnp.zeros(8)

    counts = jax.jit(lambda bias: expert_counts(route(logits, top_k=2, gating="sigmoid", bias=bias).experts, 8))
    ratio = lambda bias: float(jnp.max(counts(bias)) / jnp.mean(counts(bias)))
    before = ratio(bias)
    for _ in range(300):
        bias = balance_bias_update(bias, counts(bias), rate=0.003)
    assert before > 2.0
    assert ratio(bias) < 1.3, (before, ratio(bias))


def test_module_reports_aux_loss_and_metrics_and_proposes_the_bias():
    ffn = MoEFeedForward(
        D, num_experts=E, expert_width=F, top_k=K, num_shared_experts=1, dispatch="capacity", capacity_factor=0.5,
        aux_loss_weight=0.1, bias_update_rate=0.01, rngs=nnx.Rngs(0),
    )  # fmt: skip
    assert ffn.shared.width == F
    x = jax.random.normal(jax.random.key(5), (2, 12, D))
    graphdef, params, state = nnx.split(ffn, nnx.Param, StateVariable)

    @jax.jit
    def step(params, state, x):  # as the train step does: forward, collect the reports, commit the state
        model = nnx.merge(graphdef, params, state)
        y = model(x)
        reports = pop_reports(model)
        return y, reports, commit_updates(model), nnx.state(model, StateVariable)

    y, (aux_total, metrics), committed, new_state = step(params, state, x)
    assert y.shape == x.shape and committed == 1
    assert set(metrics) == {
        "moe_aux_loss",
        "moe_weighted_aux_loss",
        "moe_load_max_over_mean",
        "moe_dropped_share",
        "moe_router_entropy",
    }
    np.testing.assert_allclose(aux_total, 0.1 * metrics["moe_aux_loss"], rtol=1e-6)
    assert 0 < float(metrics["moe_dropped_share"]) < 1  # capacity factor 0.5 must drop some
    assert 0 < float(metrics["moe_router_entropy"]) <= np.log(E) + 1e-5
    before, after = np.asarray(state["selection_bias"][...]), np.asarray(new_state["selection_bias"][...])
    np.testing.assert_array_equal(before, np.zeros(E))
    assert np.abs(after).max() == pytest.approx(0.01)  # one sign step of the bias update rate


def test_padding_tokens_take_no_slot_and_are_left_out_of_loads_and_metrics():
    """Real tokens interleaved with padding route, fill capacity and count exactly as the real tokens alone."""
    x, router, w = _weights(7)
    valid = jnp.asarray(np.arange(T) % 3 != 1)  # every third token is padding
    real = np.flatnonzero(np.asarray(valid))
    r = route(x @ router, top_k=K)
    weights = jnp.where(valid[:, None], r.weights, 0.0)
    r_real = route(x[real] @ router, top_k=K)
    capacity = 4  # small enough that real tokens are dropped too
    # Jitted: one compile per shape instead of one per eager op (the sort/scatter paths have many).
    by_capacity = jax.jit(functools.partial(experts_capacity, capacity=capacity))
    dropless = jax.jit(experts_dropless)
    y, dropped = by_capacity(x, r.experts, weights, *w, valid=valid)
    y_real, dropped_real = by_capacity(x[real], r_real.experts, r_real.weights, *w)
    np.testing.assert_allclose(y[real], y_real, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[np.asarray(~valid)], 0.0)
    assert int(dropped) == int(dropped_real) > 0
    np.testing.assert_array_equal(expert_counts(r.experts, E, valid), expert_counts(r_real.experts, E))
    np.testing.assert_allclose(
        load_balancing_loss(r.probs, r.experts, valid), load_balancing_loss(r_real.probs, r_real.experts), rtol=1e-6
    )
    np.testing.assert_allclose(router_entropy(r.probs, valid), router_entropy(r_real.probs), rtol=1e-6)
    y_dropless = dropless(x, r.experts, weights, *w)
    np.testing.assert_allclose(
        y_dropless[real], dropless(x[real], r_real.experts, r_real.weights, *w), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(y_dropless[np.asarray(~valid)], 0.0)


@pytest.mark.slow  # two eager module calls (~6 s); the pure functions' padding test above is the fast one
def test_module_reports_the_loads_of_real_tokens_of_a_padded_batch():
    # The module: a padded batch reports the loads of its real tokens; an Encoder passes its mask through.
    x, _, _ = _weights(7)
    valid = jnp.asarray(np.arange(T) % 3 != 1)
    real = np.flatnonzero(np.asarray(valid))
    ffn = MoEFeedForward(D, num_experts=E, expert_width=F, top_k=K, rngs=nnx.Rngs(0))
    xb = x.reshape(2, T // 2, D)
    ffn(xb, valid=valid.reshape(2, T // 2))
    _, padded = pop_reports(ffn)
    ffn(x[real][None])
    _, alone = pop_reports(ffn)
    for k in ("moe_load_max_over_mean", "moe_router_entropy", "moe_aux_loss"):
        np.testing.assert_allclose(padded[k], alone[k], rtol=1e-5, err_msg=k)


def test_grouped_matmul_choice_and_tile_rows():
    assert grouped_matmul_for("auto", "tpu") == "ragged_dot"
    assert grouped_matmul_for("auto", "cpu") == grouped_matmul_for("auto", "gpu") == "tiles"
    assert grouped_matmul_for("ragged_dot", "cpu") == "ragged_dot"
    with pytest.raises(ValueError, match=r"grouped_matmul='blocks' is not one of \['auto', 'ragged_dot', 'tiles'\]"):
        grouped_matmul_for("blocks")
    # Half the mean group as a power of two, within [8, 256]: decode steps get small tiles.
    assert [tile_rows(n, 16) for n in (24, 1024, 12288, 10**6)] == [8, 32, 256, 256]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_experts": 4, "top_k": 5}, r"top_k=5 is not allowed: expected an int in \[1, num_experts=4\]"),
        ({"num_experts": 0, "top_k": 1}, r"num_experts=0 is not allowed: expected an int >= 1"),
        ({"num_experts": 4, "top_k": 2, "capacity_factor": 0.0}, r"capacity_factor=0.0 is not allowed"),
        ({"num_experts": 6, "top_k": 2, "num_groups": 4}, r"num_groups=4 must divide num_experts=6 \(\[1, 2, 3, 6\]"),
        ({"num_experts": 4, "top_k": 2, "dispatch": "sorted"}, r"dispatch='sorted' is not one of"),
        ({"num_experts": 4, "top_k": 2, "grouped_matmul": "gmm"}, r"grouped_matmul='gmm' is not one of"),
    ],
)
def test_bad_arguments_name_the_argument_the_value_and_what_is_allowed(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEFeedForward(D, expert_width=F, rngs=nnx.Rngs(0), **kw)


# The `experts` logical axis on the fsdp mesh axis: each device holds one expert's weights. Slow: two
# compiles on 8 fake devices (capacity ~18 s, dropless ~25 s on 2 loaded cores).
@pytest.mark.slow
@pytest.mark.parametrize("dispatch, grouped", [("dropless", "tiles"), ("dropless", "ragged_dot"), ("capacity", "auto")])
def test_experts_sharded_over_8_devices_equal_one_device(dispatch, grouped):
    mesh = partitioning.make_mesh(defaults.mesh(data=1, fsdp=8, tensor=1))
    rules = (("experts", "fsdp"), ("batch", "fsdp"))
    ffn = MoEFeedForward(
        D, num_experts=8, expert_width=F, top_k=K, dispatch=dispatch, grouped_matmul=grouped, rngs=nnx.Rngs(1)
    )
    graphdef, params, state = nnx.split(ffn, nnx.Param, StateVariable)
    specs = partitioning.param_specs(params, rules, mesh)
    assert specs["gate"] == P("fsdp", None, None) and specs["down"] == P("fsdp", None, None)

    def fwd(params, x):
        return nnx.merge(graphdef, params, state)(x, decode=True)  # decode: no reports to carry out

    x = jax.random.normal(jax.random.key(6), (8, 6, D))
    pure = nnx.to_pure_dict(params)
    want = jax.jit(fwd)(pure, x)
    shard = lambda s: NamedSharding(mesh, s)
    sharded = jax.device_put(pure, jax.tree.map(shard, specs, is_leaf=lambda s: isinstance(s, P)))
    got = jax.jit(fwd, out_shardings=shard(P("fsdp")))(sharded, jax.device_put(x, shard(P("fsdp"))))
    assert len(sharded["gate"].sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
