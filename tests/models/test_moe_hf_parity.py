"""Parity with real peers: HF transformers' PyTorch DeepseekV3MoE (sigmoid routing with the score-correction
bias, group-limited top-k, normalised weights x routed_scaling_factor, one shared expert) and
MixtralSparseMoeBlock (softmax, renormalised top-k) against MoEFeedForward with the same weights: the same
outputs in float32, on every dispatch path."""

import numpy as np
import pytest
from flax import nnx

from effitrans.layers.moe import MoEFeedForward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
deepseek = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")

D, F, E, K = 16, 8, 8, 2
DISPATCHES = ("dense", "dropless", "capacity")  # capacity factor E / K below: capacity T, nothing dropped


def _numpy(a):
    return np.asarray(a.detach().numpy(), np.float32)


def _randomize(peer):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0.0, 0.3)
    return peer.float().eval()


def _load_routed(ours, router, experts):
    """router [E, D] (torch Linear layout); experts with gate_up_proj [E, 2F, D] (gate rows, then up rows) and
    down_proj [E, D, F]."""
    gate_up = _numpy(experts.gate_up_proj)
    ours.router.set_value(_numpy(router).T)  # [D, E]
    ours.gate.set_value(gate_up[:, :F].transpose(0, 2, 1))  # [E, D, F]
    ours.up.set_value(gate_up[:, F:].transpose(0, 2, 1))
    ours.down.set_value(_numpy(experts.down_proj).transpose(0, 2, 1))  # [E, F, D]


def _compare(peer, build, load):
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        want = peer(x).numpy()
    for dispatch in DISPATCHES:
        ours = build(dispatch)
        load(ours)
        got = np.asarray(ours(x.numpy(), decode=True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=dispatch)


@pytest.mark.slow  # imports torch + transformers (~10 s)
def test_matches_hf_deepseek_v3_moe():
    cfg = transformers.DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, hidden_act="silu",
    )  # fmt: skip
    peer = _randomize(deepseek.DeepseekV3MoE(cfg))
    with torch.no_grad():
        peer.gate.e_score_correction_bias.normal_(0.0, 0.05)

    def load(ours):
        _load_routed(ours, peer.gate.weight, peer.experts)
        for name in ("gate", "up", "down"):
            getattr(ours.shared, name).set_value(_numpy(getattr(peer.shared_experts, f"{name}_proj").weight).T)
        ours.selection_bias.set_value(_numpy(peer.gate.e_score_correction_bias))

    build = lambda dispatch: MoEFeedForward(
        D, num_experts=E, expert_width=F, top_k=K, num_shared_experts=1, gating="sigmoid", route_scale=2.5,
        num_groups=2, top_groups=1, dispatch=dispatch, capacity_factor=E / K, rngs=nnx.Rngs(0),
    )  # fmt: skip
    _compare(peer, build, load)


@pytest.mark.slow
def test_matches_hf_mixtral_sparse_moe_block():
    cfg = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K, hidden_act="silu"
    )
    peer = _randomize(mixtral.MixtralSparseMoeBlock(cfg))
    build = lambda dispatch: MoEFeedForward(
        D, num_experts=E, expert_width=F, top_k=K, gating="softmax", dispatch=dispatch, capacity_factor=E / K,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    _compare(peer, build, lambda ours: _load_routed(ours, peer.gate.weight, peer.experts))
