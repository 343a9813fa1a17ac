"""Every loss of the zoo against its formula on a hand-computed case (numbers from plain math, not the code)."""

import math

import numpy as np
import pytest
import torch

from fedlt.losses import (
    bal_bce_loss,
    balanced_softmax_loss,
    balpoe_loss,
    class_balanced_loss,
    class_weights,
    confident_kl,
    cross_entropy_loss,
    focal_loss,
    label_aware_epsilons,
    label_aware_smoothing_loss,
    ldam_loss,
    ldam_margins,
    log_prior,
    logit_adjusted_loss,
    mdcs_loss,
    mixup_batch,
    mixup_cross_entropy,
    posthoc_adjust,
    reweighted_loss,
    sigmoid_bias_init,
    smoothed_one_hot,
)
from fedlt.registry import LOSSES

L3 = math.log(3.0)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_every_loss_is_registered():
    assert list(LOSSES) == ["bal_bce", "balanced_softmax", "cb", "ce", "eql", "focal", "la", "label_aware_smoothing", "ldam",
                            "reweight", "seql"]
    # not loss(logits, targets): a test-time logit transform, a batch transform, multi-expert objectives
    for name in ("posthoc_la", "mixup", "balpoe", "mdcs"):
        assert name not in LOSSES


def test_registered_factories_give_the_hand_computed_values():
    """``LOSSES.get(name)(class_counts, **options)(logits, targets)`` on the cases below."""
    z, y = t([[2.0, 0.0, 0.0]]), torch.tensor([0])
    counts3 = torch.tensor([100, 10, 1])
    assert LOSSES.get("ce")(counts3)(z, y).item() == pytest.approx(0.2395448, abs=1e-6)
    assert LOSSES.get("focal")(counts3)(z, y).item() == pytest.approx(0.0510264, abs=1e-6)
    assert LOSSES.get("focal")(counts3, gamma=0.0)(z, y).item() == pytest.approx(0.2395448, abs=1e-6)
    z2, y2 = t([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 2])
    assert LOSSES.get("reweight")(counts3)(z2, y2).item() == pytest.approx(1.0901067, abs=1e-6)
    w = [0.2393292, 2.3932288]
    expected = (w[0] * 0.2395448 + w[1] * L3) / (w[0] + w[1])
    assert LOSSES.get("cb")(counts3, beta=0.9, reduction="weighted_mean")(z2, y2).item() == pytest.approx(
        expected, abs=1e-6)
    assert LOSSES.get("cb")(counts3, beta=0.9)(z2, y2).item() == pytest.approx(
        (w[0] * 0.2395448 + w[1] * L3) / 2, abs=1e-6)  # the official batch mean
    cos, yc = t([[0.5, 0.2], [0.5, 0.2]]), torch.tensor([0, 1])
    ldam = LOSSES.get("ldam")(torch.tensor([16, 1]))
    assert ldam(cos, yc).item() == pytest.approx((0.2014133 + 24.0) / 2, abs=1e-5)
    # β = 0.5 on n = (16, 1): (1 − β)/(1 − β^n) = (0.5000076, 1) -> w ∝ (1, 1.9999695)
    drw = LOSSES.get("ldam")(torch.tensor([16, 1]), beta=0.5)
    assert drw(cos, yc).item() == pytest.approx((0.2014133 + 1.9999695 * 24) / 2.9999695, abs=1e-5)
    zero, y1 = t([[0.0, 0.0]]), torch.tensor([1])
    assert LOSSES.get("balanced_softmax")(torch.tensor([3, 1]))(zero, y1).item() == pytest.approx(1.3862944, abs=1e-6)
    # τ = 0.5: CE((0.5 log .75, 0.5 log .25), 1) = log((√.75 + 0.5) / 0.5) = 1.0050526
    assert LOSSES.get("la")(torch.tensor([3, 1]), tau=0.5)(zero, y1).item() == pytest.approx(1.0050526, abs=1e-6)
    bal = LOSSES.get("bal_bce")(torch.tensor([3, 1]))
    assert bal(zero, torch.tensor([0])).item() == pytest.approx(0.6852254, abs=1e-6)
    las = LOSSES.get("label_aware_smoothing")(torch.tensor([100, 10]))
    assert las(t([[L3, 0.0]]), torch.tensor([0])).item() == pytest.approx(0.5074045, abs=1e-6)


def test_bal_bce_with_an_absent_class_is_finite():
    # π = (1, 0) clamped to (1 − 1e-12, 1e-12): shifts ±log(1e12 − 1) ≈ ±27.631; class-1 target 0.05 ->
    # BCE(−27.631, 0.05) ≈ 0.05·27.631; class 0: BCE(27.631, 0.95) ≈ 0.05·27.631; L = 2·mean = 2·0.05·27.631
    loss = bal_bce_loss(t([[0.0, 0.0]]), torch.tensor([0]), [5, 0], 0.1)
    assert loss.item() == pytest.approx(0.05 * 2 * 27.631021, abs=1e-4)


def test_cross_entropy_and_focal():
    z, y = t([[2.0, 0.0, 0.0]]), torch.tensor([0])
    # CE = log(1 + 2e^-2) = 0.2395448; p_y = e^2/(e^2+2) = 0.7869860
    assert cross_entropy_loss(z, y).item() == pytest.approx(0.2395448, abs=1e-6)
    # focal γ=1: (1 − 0.7869860)·0.2395448 = 0.0510264
    assert focal_loss(z, y, 1.0).item() == pytest.approx(0.0510264, abs=1e-6)
    assert focal_loss(z, y, 0.0).item() == pytest.approx(0.2395448, abs=1e-6)


def test_class_weights_inverse_frequency_and_effective_number():
    counts = [100, 10, 1]
    # 1/n = (0.01, 0.1, 1), Σ = 1.11, × C=3 / Σ
    assert class_weights(counts).tolist() == pytest.approx([0.0270270, 0.2702703, 2.7027027], abs=1e-6)
    # β = 0.9: (1−β)/(1−β^n) = (0.1000027, 0.1535338, 1.0), normalised to Σ = 3
    assert class_weights(counts, 0.9).tolist() == pytest.approx([0.2393292, 0.3674420, 2.3932288], abs=1e-6)
    assert class_weights(counts, 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert class_weights(counts, 0.9).sum().item() == pytest.approx(3.0)


def test_reweighting_uses_pytorch_weighted_mean():
    z = t([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    # ℓ = (0.2395448, log 3); w_y = (0.0270270, 2.7027027); Σ wℓ / Σ w = 1.0901067 (batch mean would be 1.4869)
    assert reweighted_loss(z, y, [100, 10, 1]).item() == pytest.approx(1.0901067, abs=1e-6)
    w = [0.2393292, 2.3932288]
    expected = (w[0] * 0.2395448 + w[1] * L3) / (w[0] + w[1])
    assert class_balanced_loss(z, y, [100, 10, 1], beta=0.9, reduction="weighted_mean").item() == pytest.approx(
        expected, abs=1e-6)


def official_class_balanced_softmax_loss(logits, labels, img_num_per_cls, beta):
    """richardaecn/class-balanced-loss ``src/cifar_main.py``: weights (1 − β)/(1 − β^n) normalised to sum C; per
    sample w_{y_i}; ``tf.losses.softmax_cross_entropy(onehot, logits, weights=w)``, whose default reduction
    SUM_BY_NONZERO_WEIGHTS is Σ_i w_i·CE_i / #{i: w_i ≠ 0}."""
    n = np.asarray(img_num_per_cls, dtype=np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, n))
    weights = weights / weights.sum() * len(n)
    w = weights[labels.numpy()]
    z = logits.double().numpy()
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), labels.numpy()]
    return float((w * ce).sum() / np.count_nonzero(w))


def test_class_balanced_loss_is_the_official_softmax_loss():
    g = torch.Generator().manual_seed(0)
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT, IF 100
    z, y = torch.randn(64, 10, generator=g) * 3, torch.randint(0, 10, (64,), generator=g)
    official = official_class_balanced_softmax_loss(z, y, counts, 0.9999)
    assert class_balanced_loss(z, y, counts).item() == pytest.approx(official, rel=1e-5)
    assert LOSSES.get("cb")(torch.tensor(counts))(z, y).item() == pytest.approx(official, rel=1e-5)
    weighted = class_balanced_loss(z, y, counts, reduction="weighted_mean").item()
    assert weighted == pytest.approx(official / class_weights(counts, 0.9999)[y].mean().item(), rel=1e-5)


def test_ldam_margins_and_loss():
    # n^{-1/4} of (16, 1) = (0.5, 1) -> scaled so the max is 0.5
    assert ldam_margins([16, 1]).tolist() == pytest.approx([0.25, 0.5])
    cos = t([[0.5, 0.2], [0.5, 0.2]])
    y = torch.tensor([0, 1])
    # sample 0: z = 30·(0.5 − 0.25, 0.2) = (7.5, 6) -> log(1 + e^-1.5) = 0.2014133
    # sample 1: z = 30·(0.5, 0.2 − 0.5) = (15, −9)  -> log(1 + e^24) = 24.0000000
    loss = ldam_loss(cos, y, ldam_margins([16, 1]), 30.0)
    assert loss.item() == pytest.approx((0.2014133 + 24.0) / 2, abs=1e-5)
    # DRW weights w = (1, 3): (1·0.2014133 + 3·24) / 4
    w = t([1.0, 3.0])
    assert ldam_loss(cos, y, ldam_margins([16, 1]), 30.0, w).item() == pytest.approx((0.2014133 + 72) / 4, abs=1e-5)


def test_logit_adjusted_balanced_softmax_and_posthoc_signs():
    log_pi = log_prior(torch.tensor([3.0, 1.0]))  # log(0.75), log(0.25)
    z, y = t([[0.0, 0.0]]), torch.tensor([1])
    # loss mode: CE(z + log π, 1) = −log 0.25 = 1.3862944
    assert logit_adjusted_loss(z, y, log_pi, 1.0).item() == pytest.approx(1.3862944, abs=1e-6)
    assert balanced_softmax_loss(z, y, log_pi).item() == pytest.approx(1.3862944, abs=1e-6)
    # post-hoc: z − τ log π = (0.2876821, 1.3862944): the tail class wins
    assert posthoc_adjust(z, log_pi, 1.0)[0].tolist() == pytest.approx([0.2876821, 1.3862944], abs=1e-6)
    assert posthoc_adjust(z, log_pi, 0.5)[0].tolist() == pytest.approx([0.1438410, 0.6931472], abs=1e-6)


def test_bal_bce():
    # π = (0.75, 0.25): shifts ±log 3; targets (0.95, 0.05) with ε = 0.1, C = 2
    assert smoothed_one_hot(torch.tensor([0]), 2, 0.1)[0].tolist() == pytest.approx([0.95, 0.05])
    # BCE(x, t) = log(1 + e^x) − t·x: class 0 log 4 − 0.95·log 3, class 1 log(4/3) + 0.05·log 3; sum 0.6852254
    loss = bal_bce_loss(t([[0.0, 0.0]]), torch.tensor([0]), [3, 1], 0.1)
    assert loss.item() == pytest.approx(0.6852254, abs=1e-6)
    assert sigmoid_bias_init(10) == pytest.approx(-math.log(9))


def test_mixup_cross_entropy_and_batch():
    z = t([[L3, 0.0]])  # p = (0.75, 0.25)
    # 0.7·(−log 0.75) + 0.3·(−log 0.25) = 0.6172658
    loss = mixup_cross_entropy(z, torch.tensor([0]), torch.tensor([1]), 0.7)
    assert loss.item() == pytest.approx(0.6172658, abs=1e-6)
    x = torch.arange(6, dtype=torch.float32)[:, None]
    y = torch.arange(6)
    xm, ya, yb, lam = mixup_batch(x, y, 1.0, np.random.default_rng(0))
    assert 0 <= lam <= 1 and torch.equal(ya, y)
    assert torch.allclose(xm[:, 0], lam * y.float() + (1 - lam) * yb.float())
    assert sorted(yb.tolist()) == list(range(6))
    assert mixup_batch(x, y, 0.0, np.random.default_rng(0))[3] == 1.0


def test_label_aware_smoothing():
    # ε_c = 0.1 + 0.3·sin(π(n_c − 10)/180): (0.4, 0.1 + 0.3·sin 40°, 0.1)
    assert label_aware_epsilons([100, 50, 10], 0.4, 0.1).tolist() == pytest.approx([0.4, 0.2928363, 0.1], abs=1e-6)
    eps = label_aware_epsilons([100, 10], 0.4, 0.1)
    # p = (0.75, 0.25), y = 0, ε = 0.4: 0.6·log(4/3) + 0.4·(log(4/3) + log 4)/2 = 0.5074045
    loss = label_aware_smoothing_loss(t([[L3, 0.0]]), torch.tensor([0]), eps)
    assert loss.item() == pytest.approx(0.5074045, abs=1e-6)


def test_balpoe_loss():
    log_pi = log_prior(torch.tensor([3.0, 1.0]))
    z = torch.zeros(3, 1, 2)
    # τ = 0: log 2; τ = 1: −log 0.25; τ = 2: p_1 = 0.0625/0.625 = 0.1 -> −log 0.1; mean 1.4606755
    assert balpoe_loss(z, torch.tensor([1]), log_pi, (0.0, 1.0, 2.0)).item() == pytest.approx(1.4606755, abs=1e-6)


def test_confident_kl_and_mdcs():
    teacher = t([[L3, 0.0], [L3, 0.0]])  # p = (0.75, 0.25)
    student = t([[0.0, 0.0], [5.0, 0.0]])
    y = torch.tensor([0, 1])  # the second sample is not confident (teacher argmax 0 ≠ 1): excluded
    # KL((.75,.25) ‖ (.5,.5)) = .75 log 1.5 + .25 log .5 = 0.1308120
    assert confident_kl(teacher, student, y).item() == pytest.approx(0.1308120, abs=1e-6)
    assert confident_kl(teacher, student, torch.tensor([1, 1])).item() == 0.0
    zero = log_prior(torch.tensor([1.0, 1.0])) * 0
    # one expert, λ = 0: CE over the 2B stacked views = (log(4/3) + log 2)/2, + 0.5·KL: 0.4904146 + 0.0654060
    loss = mdcs_loss(teacher[None, :1], student[None, :1], y[:1], zero, (0.0,), 0.5)
    assert loss.item() == pytest.approx(0.5558206, abs=1e-6)
    # λ shifts by λ·log π: λ = 1 on π = (.75, .25) equals CE(z + log π)
    log_pi = log_prior(torch.tensor([3.0, 1.0]))
    z = torch.zeros(1, 1, 2)
    loss = mdcs_loss(z, z, torch.tensor([1]), log_pi, (1.0,), 0.0)
    assert loss.item() == pytest.approx(1.3862944, abs=1e-6)
