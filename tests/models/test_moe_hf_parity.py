"""Parity with a real peer: HF transformers' PyTorch DeepseekV3MoE (sigmoid routing with the score-correction
bias, group-limited top-k, normalised weights x routed_scaling_factor, one shared expert) and MoEFeedForward
with the same weights give the same outputs in float32, on every dispatch path."""

import numpy as np
import pytest
from flax import nnx

from effitrans.layers.moe import MoEFeedForward

torch = pytest.importorskip("torch")
deepseek = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
DeepseekV3Config = pytest.importorskip("transformers").DeepseekV3Config

D, F, E, K = 16, 8, 8, 2


@pytest.mark.slow  # imports torch + transformers (~10 s)
def test_matches_hf_deepseek_v3_moe():
    cfg = DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=K, n_shared_experts=1,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, hidden_act="silu",
    )  # fmt: skip
    torch.manual_seed(0)
    peer = deepseek.DeepseekV3MoE(cfg).float().eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0.0, 0.3)
        peer.gate.e_score_correction_bias.normal_(0.0, 0.05)
    x = torch.randn(3, 7, D)
    with torch.no_grad():
        want = peer(x).numpy()

    t = lambda a: np.asarray(a.detach().numpy(), np.float32)
    gate_up = t(peer.experts.gate_up_proj)  # [E, 2F, D]: gate rows, then up rows
    for dispatch in ("dense", "dropless", "capacity"):  # capacity factor E / K: capacity T, nothing dropped
        ours = MoEFeedForward(
            D, num_experts=E, expert_width=F, top_k=K, num_shared_experts=1, gating="sigmoid", route_scale=2.5,
            num_groups=2, top_groups=1, dispatch=dispatch, capacity_factor=E / K, rngs=nnx.Rngs(0),
        )  # fmt: skip
        ours.router.set_value(t(peer.gate.weight).T)  # [E, D] -> [D, E]
        ours.gate.set_value(gate_up[:, :F].transpose(0, 2, 1))  # [E, D, F]
        ours.up.set_value(gate_up[:, F:].transpose(0, 2, 1))
        ours.down.set_value(t(peer.experts.down_proj).transpose(0, 2, 1))  # [E, D, F] -> [E, F, D]
        ours.shared.gate.set_value(t(peer.shared_experts.gate_proj.weight).T)
        ours.shared.up.set_value(t(peer.shared_experts.up_proj.weight).T)
        ours.shared.down.set_value(t(peer.shared_experts.down_proj.weight).T)
        ours.selection_bias.set_value(t(peer.gate.e_score_correction_bias))
        got = np.asarray(ours(x.numpy(), decode=True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=dispatch)
