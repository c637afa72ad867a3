"""Loss variants against hand computations, pooling, projection heads."""
from __future__ import annotations

import math

import pytest
import torch

from staged_alignment.trainers.causal_losses import (
    ProjectionHead,
    build_projection_head,
    check_temperature,
    contrastive_loss,
    lm_token_nll,
    pool_hidden_states,
)

# Fixed 2-D vectors whose cosines are known by hand:
#   triplet 0: b=(1,0), c=(1,1) → cos = 1/√2;  i=(0,1)  → cos = 0
#   triplet 1: b=(0,2), c=(0,3) → cos = 1;     i=(3,-3) → cos = -1/√2
ZB = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
ZC = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
ZI = torch.tensor([[0.0, 1.0], [3.0, -3.0]])
R2 = 1 / math.sqrt(2)


def test_cosine_variant_by_hand():
    tau, lc, ls = 0.5, 2.0, 3.0
    out = contrastive_loss(ZB, ZC, ZI, variant="cosine", temperature=tau, lambda_causal=lc, lambda_spurious=ls)
    causal = -lc * ((R2 + 1.0) / 2) / tau  # −λ_c · mean cos(b,c) / τ
    spurious = ls * ((0.0 - R2) / 2) / tau  # +λ_s · mean cos(b,i) / τ
    assert out.loss_causal.item() == pytest.approx(causal, abs=1e-6)
    assert out.loss_spurious.item() == pytest.approx(spurious, abs=1e-6)
    assert out.loss.item() == pytest.approx(causal + spurious, abs=1e-6)
    assert torch.allclose(out.cos_bc, torch.tensor([R2, 1.0]), atol=1e-6)
    assert torch.allclose(out.cos_bi, torch.tensor([0.0, -R2]), atol=1e-6)


def test_margin_variant_stops_at_the_floor():
    tau = 0.25
    # floor −0.5: triplet 0 (cos 0) is above it by 0.5, triplet 1 (cos −0.707) below it → relu = 0
    out = contrastive_loss(ZB, ZC, ZI, variant="margin", temperature=tau, lambda_causal=1.0, lambda_spurious=1.0,
                           margin_floor=-0.5)
    assert out.loss_causal.item() == pytest.approx(-((R2 + 1.0) / 2) / tau, abs=1e-6)
    assert out.loss_spurious.item() == pytest.approx(((0.5 + 0.0) / 2) / tau, abs=1e-6)
    # floor 0 (Circuit Breakers' relu(cos)): both triplets at or below 0 → no separation term at all
    out0 = contrastive_loss(ZB, ZC, ZI, variant="margin", temperature=tau, margin_floor=0.0)
    assert out0.loss_spurious.item() == 0.0
    # and no gradient flows from a term below the floor
    zi = ZI.clone().requires_grad_(True)
    contrastive_loss(ZB, ZC, zi, variant="margin", temperature=tau, margin_floor=0.0).loss.backward()
    assert torch.count_nonzero(zi.grad) == 0


def test_infonce_variant_by_hand():
    tau = 0.5
    out = contrastive_loss(ZB, ZC, ZI, variant="infonce", temperature=tau, lambda_causal=1.5)
    # ℓ_k = −log e^{cos(b,c)/τ} / (e^{cos(b,c)/τ} + e^{cos(b,i)/τ})
    l0 = -math.log(math.exp(R2 / tau) / (math.exp(R2 / tau) + math.exp(0.0 / tau)))
    l1 = -math.log(math.exp(1.0 / tau) / (math.exp(1.0 / tau) + math.exp(-R2 / tau)))
    assert out.loss.item() == pytest.approx(1.5 * (l0 + l1) / 2, abs=1e-6)
    assert out.loss_spurious.item() == 0.0


def test_infonce_in_batch_negatives_by_hand():
    tau = 0.5
    out = contrastive_loss(ZB, ZC, ZI, variant="infonce", temperature=tau, in_batch_negatives=True)
    # candidates of b_k: c_0, c_1, i_0, i_1; positive c_k.
    # b_0=(1,0): cos with c_0=1/√2, c_1=0, i_0=0, i_1=1/√2 ;  b_1=(0,1): c_0=1/√2, c_1=1, i_0=1, i_1=−1/√2
    s0 = [R2, 0.0, 0.0, R2]
    s1 = [R2, 1.0, 1.0, -R2]
    l0 = -math.log(math.exp(s0[0] / tau) / sum(math.exp(x / tau) for x in s0))
    l1 = -math.log(math.exp(s1[1] / tau) / sum(math.exp(x / tau) for x in s1))
    assert out.loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)


@pytest.mark.parametrize("tau", [0.0, 0.009, 1.01, -0.1, float("nan")])
def test_temperature_out_of_range_is_an_error(tau):
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(ZB, ZC, ZI, temperature=tau)
    with pytest.raises(ValueError):
        check_temperature(tau)


def test_temperature_bounds_are_accepted_and_bad_variant_rejected():
    assert check_temperature(0.01) == 0.01 and check_temperature(1.0) == 1.0
    with pytest.raises(ValueError, match="variant"):
        contrastive_loss(ZB, ZC, ZI, variant="triplet")
    with pytest.raises(ValueError, match="B, D"):
        contrastive_loss(ZB, ZC, ZI[:1])


def test_pooling_is_the_mean_over_real_tokens_left_and_right_padded():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pr = pool_hidden_states(h, right)
    pl = pool_hidden_states(h, left)
    assert torch.allclose(pr[0], h[0, :3].mean(0)) and torch.allclose(pr[1], h[1].mean(0))
    assert torch.allclose(pl[0], h[0, 2:].mean(0)) and torch.allclose(pl[1], h[1].mean(0))
    # the same sequence padded on either side pools to the same vector
    seq = torch.randn(3, 3)
    hr = torch.cat([seq, torch.full((2, 3), 7.0)]).unsqueeze(0)
    hl = torch.cat([torch.full((2, 3), -7.0), seq]).unsqueeze(0)
    assert torch.allclose(pool_hidden_states(hr, right[:1]), pool_hidden_states(hl, left[:1]))


def test_pooling_ignores_nan_in_padding_and_its_gradient():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("inf")]]], requires_grad=True)
    m = torch.tensor([[1, 1, 0]])
    p = pool_hidden_states(h, m)
    assert torch.equal(p, torch.tensor([[2.0, 3.0]]))
    p.sum().backward()
    assert torch.equal(h.grad, torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]]))


def test_pooling_rejects_empty_rows_and_bad_shapes():
    with pytest.raises(ValueError, match="no unmasked"):
        pool_hidden_states(torch.zeros(1, 2, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="expected"):
        pool_hidden_states(torch.zeros(1, 2, 3), torch.ones(1, 3))


@pytest.mark.parametrize("kind,n_linear", [("linear", 1), ("mlp", 2), ("bottleneck", 2)])
def test_projection_heads(kind, n_linear):
    head = build_projection_head(kind, 12, dim=6, hidden=4, seed=3)
    again = build_projection_head(kind, 12, dim=6, hidden=4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    out = head(torch.randn(5, 12, dtype=torch.float64))
    assert out.shape == (5, 6) and out.dtype == torch.float32
    assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == n_linear
    assert head.config() == {"type": kind, "in_dim": 12, "dim": 6, "hidden": 4}
    with pytest.raises(ValueError, match="unknown projection head"):
        ProjectionHead("conv", 12)


def test_seeded_head_does_not_touch_the_global_rng():
    torch.manual_seed(1)
    a = torch.rand(1)
    torch.manual_seed(1)
    build_projection_head("mlp", 8, 4, 4, seed=0)
    assert torch.equal(torch.rand(1), a)


def test_lm_token_nll_selects_labelled_positions():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[float("nan"), 0.0, 0.0], [0.0, 0.0, 3.0]]])
    targets = torch.tensor([[0, -100], [-100, 2]])
    nll = lm_token_nll(logits, targets)
    e = math.exp
    assert nll.tolist() == pytest.approx([-math.log(e(2) / (e(2) + 2)), -math.log(e(3) / (e(3) + 2))], abs=1e-6)


# ------------------------------------------------------------------ the output-level terms
def test_token_kl_by_hand_and_stop_gradient_on_the_clean_side():
    from staged_alignment.trainers.causal_losses import token_kl

    ref = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]], requires_grad=True)  # p = (.5,.5), (.75,.25)
    cur = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]], requires_grad=True)  # q = (.75,.25), (.5,.5)
    rows = torch.tensor([0, 0, 1])
    kl = token_kl(ref, cur, rows, 3)
    k1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p‖q), row 0 token 0
    k2 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl.tolist() == pytest.approx([(k1 + k2) / 2, 0.0, 0.0], abs=1e-6)  # row 2 has no token: 0
    kl.sum().backward()
    assert ref.grad is None or not ref.grad.abs().any()  # sg[p(·|x_b)]: no gradient into the clean side
    assert cur.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        token_kl(ref, cur[:2], rows, 3)


def test_dpo_sigmoid_loss_by_hand():
    from staged_alignment.trainers.causal_losses import dpo_sigmoid_loss

    pw, pl, rw, rl = (torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0]), torch.tensor([-3.5, -1.0]),
                      torch.tensor([-2.0, -3.0]))
    beta = 0.5
    z = [beta * ((-3.0 + 3.5) - (-2.0 + 2.0)), beta * ((-1.0 + 1.0) - (-4.0 + 3.0))]
    expected = [math.log(1 + math.exp(-x)) for x in z]  # −log σ(z)
    assert dpo_sigmoid_loss(pw, pl, rw, rl, beta).tolist() == pytest.approx(expected, abs=1e-6)
    same = dpo_sigmoid_loss(pw, pl, pw, pl, beta)  # policy = reference (LoRA B = 0 at step 0): ln 2
    assert same.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-6)
    with pytest.raises(ValueError):
        dpo_sigmoid_loss(pw, pl, rw, rl, 0.0)


def test_anchored_infonce_by_hand_and_detached_anchor():
    from staged_alignment.trainers.causal_losses import anchored_infonce

    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p = torch.tensor([[1.0, 1.0]], requires_grad=True)  # cos 1/√2
    n = torch.tensor([[0.0, 1.0]], requires_grad=True)  # cos 0
    tau = 0.5
    got = anchored_infonce(a, [p], n, tau)
    expected = -math.log(math.exp(R2 / tau) / (math.exp(R2 / tau) + math.exp(0.0)))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    two = anchored_infonce(a, [p, torch.tensor([[1.0, 0.0]])], n, tau)  # second positive cos 1
    e2 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    assert two.item() == pytest.approx((expected + e2) / 2, abs=1e-6)
    got.sum().backward()
    assert a.grad is None and p.grad.abs().sum() > 0 and n.grad.abs().sum() > 0
