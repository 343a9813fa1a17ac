"""The classic centralized baselines against a transcription of their official code's arithmetic: LDAM-DRW's
loss, DRW switch and lr schedule, its focal loss (kaidic/LDAM-DRW), Balanced Softmax
(jiawei-ren/BalancedMetaSoftmax-Classification), τ-norm (facebookresearch/classifier-balancing), mixup
(facebookresearch/mixup-cifar10), and the shipped CIFAR-LT recipe (configs/centralized/cifar_lt.yaml).

Each ``official_*`` function transcribes (does not import or copy) the named official file; fedlt must give the
same numbers on seeded random inputs. Logit adjustment is not here: google-research's code is not at hand to
transcribe (tests/test_losses.py checks its formula on a hand-computed case).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT
from fedlt.centralized.decoupled import TauNormLinear
from fedlt.centralized.methods import mixup_objective
from fedlt.centralized.run import centralized_optim
from fedlt.config import load_config
from fedlt.data.longtail import longtail_counts
from fedlt.losses import cross_entropy_loss
from fedlt.losses.reweighting import class_weights, focal_loss
from fedlt.registry import CENTRALIZED, LOSSES

CIFAR_LT = str(ROOT / "configs/centralized/cifar_lt.yaml")
COUNTS = {10: torch.as_tensor(longtail_counts(5000, 10, 100)), 100: torch.as_tensor(longtail_counts(500, 100, 100))}


def shipped(method: str, dataset: str = "cifar10"):
    """configs/centralized/cifar_lt.yaml's run of ``method`` on ``dataset`` at IF 100 (its sweep fixed)."""
    return load_config(CIFAR_LT, [f"centralized.method={method}", f"data.name={dataset}", "sweep={}"])


# ---------------------------------------------------------------------------------------------- LDAM-DRW


def official_lr(epoch: int, lr: float = 0.1) -> float:
    """kaidic/LDAM-DRW cifar_train.py ``adjust_learning_rate``, called before each 0-based epoch."""
    epoch = epoch + 1
    if epoch <= 5:
        return lr * epoch / 5
    if epoch > 180:
        return lr * 0.0001
    if epoch > 160:
        return lr * 0.01
    return lr


def official_drw_weights(epoch: int, cls_num_list) -> torch.Tensor:
    """cifar_train.py's DRW branch: idx = epoch // 160, β ∈ [0, 0.9999], weights normalised to sum C."""
    beta = [0, 0.9999][epoch // 160]
    w = (1.0 - beta) / (1.0 - np.power(beta, cls_num_list))
    return torch.FloatTensor(w / np.sum(w) * len(cls_num_list))


def official_ldam(x, target, cls_num_list, weight, max_m=0.5, s=30):
    """losses.py ``LDAMLoss.forward`` (the margin of the target column only, then s·z into weighted CE)."""
    m_list = 1.0 / np.sqrt(np.sqrt(cls_num_list))
    m_list = torch.FloatTensor(m_list * (max_m / np.max(m_list)))
    index = torch.zeros_like(x, dtype=torch.uint8)
    index.scatter_(1, target.view(-1, 1), 1)
    batch_m = torch.matmul(m_list[None, :], index.float().transpose(0, 1)).view((-1, 1))
    output = torch.where(index.bool(), x - batch_m, x)
    return F.cross_entropy(s * output, target, weight=weight)


def test_shipped_recipe_is_ldam_drw_cifar_train():
    """SGD momentum 0.9, no Nesterov, wd 2e-4 on every parameter, batch 128, 200 epochs; the lr of every epoch
    as ``adjust_learning_rate`` sets it (warm-up lr·(e+1)/5, ×0.01 from 0-based epoch 160, ×1e-4 from 180)."""
    cfg = shipped("ldam_drw")
    opt = centralized_optim(cfg)
    assert (opt.momentum, opt.nesterov, opt.weight_decay, opt.batch_size, cfg.centralized.epochs) == (
        0.9, False, 2e-4, 128, 200)
    for epoch in range(200):
        for within in (0.0, 0.5, 0.999):
            assert opt.lr_at(epoch + within, 200) == pytest.approx(official_lr(epoch), rel=1e-12), (epoch, within)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_ldam_drw_loss_and_switch_equal_cifar_train(num_classes):
    counts = COUNTS[num_classes]
    m = CENTRALIZED.get("ldam_drw")(shipped("ldam_drw", f"cifar{num_classes}"), counts.numpy())
    g = torch.Generator().manual_seed(num_classes)
    for epoch in range(200):
        options = m.loss_options(epoch)
        assert (options["beta"] is not None) == (epoch // 160 == 1), epoch
        if epoch in (0, 159, 160, 199):
            cos = torch.rand(256, num_classes, generator=g) * 2 - 1
            y = torch.randint(0, num_classes, (256,), generator=g)
            ours = LOSSES.get("ldam")(counts, **options)(cos, y)
            official = official_ldam(cos, y, counts.tolist(), official_drw_weights(epoch, counts.tolist()))
            torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)


def official_focal(x, target, weight=None, gamma=1.0):
    """LDAM-DRW losses.py ``FocalLoss``: ``focal_loss(F.cross_entropy(x, target, reduction='none',
    weight=weight), gamma)`` = mean over the batch of (1 − e^{−ce})^γ·ce."""
    ce = F.cross_entropy(x, target, reduction="none", weight=weight)
    return ((1 - torch.exp(-ce)) ** gamma * ce).mean()


def test_focal_is_ldam_drw_focal_loss():
    """The shipped focal run (γ = 1, cifar_train.py) and the weighted form at γ = 2."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(512, 100, generator=g) * 4, torch.randint(0, 100, (512,), generator=g)
    m = CENTRALIZED.get("focal")(shipped("focal", "cifar100"), COUNTS[100].numpy())
    torch.testing.assert_close(m.objective(0)(nn.Identity(), z, y), official_focal(z, y))
    w = class_weights(COUNTS[100], 0.9999)
    torch.testing.assert_close(focal_loss(z, y, 2.0, w), official_focal(z, y, w, 2.0))


# ------------------------------------------------------------------------------------------ Balanced Softmax


def official_balanced_softmax(labels, logits, sample_per_class):
    """BalancedMetaSoftmax loss/BalancedSoftmaxLoss.py ``balanced_softmax_loss`` (reduction 'mean')."""
    spc = sample_per_class.type_as(logits).unsqueeze(0).expand(logits.shape[0], -1)
    return F.cross_entropy(input=logits + spc.log(), target=labels)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_balanced_softmax_equals_balms(num_classes):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(512, num_classes, generator=g) * 5
    y = torch.randint(0, num_classes, (512,), generator=g)
    m = CENTRALIZED.get("balanced_softmax")(shipped("balanced_softmax", f"cifar{num_classes}"),
                                            COUNTS[num_classes].numpy())
    torch.testing.assert_close(m.objective(0)(nn.Identity(), z, y),
                               official_balanced_softmax(y, z, COUNTS[num_classes]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- τ-norm


def official_pnorm(weights: torch.Tensor, p: float) -> torch.Tensor:
    """classifier-balancing tau_norm.py ``pnorm``: each row w_i / ‖w_i‖^p; the logits are
    ``dotproduct_similarity`` (features · W^T, the bias left out)."""
    norms = torch.norm(weights, 2, 1)
    out = weights.clone()
    for i in range(weights.size(0)):
        out[i] = weights[i] / torch.pow(norms[i], p)
    return out


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.7])
def test_tau_norm_is_classifier_balancing_pnorm(tau):
    torch.manual_seed(0)
    head = nn.Linear(64, 100)
    nn.init.kaiming_normal_(head.weight)
    nn.init.normal_(head.bias)
    features = torch.randn(300, 64).relu()
    torch.testing.assert_close(TauNormLinear(head, tau)(features), features @ official_pnorm(head.weight.data, tau).t())


# ----------------------------------------------------------------------------------------------------- mixup


def test_mixup_is_mixup_cifar10():
    """facebookresearch/mixup-cifar10 train.py ``mixup_data`` / ``mixup_criterion``: λ ~ Beta(α, α) and one
    permutation per batch; λ·CE(ŷ, y_a) + (1 − λ)·CE(ŷ, y_b) on the mixed (normalised) inputs."""
    x, y = torch.randn(128, 3, 8, 8), torch.randint(0, 10, (128,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 10))
    ours = mixup_objective(SimpleNamespace(rng=np.random.default_rng(123)), 1.0, cross_entropy_loss)(model, x, y)
    rng = np.random.default_rng(123)  # the same draws, in the official order: λ, then the permutation
    lam = rng.beta(1.0, 1.0)
    index = torch.from_numpy(rng.permutation(128))
    out = model(lam * x + (1 - lam) * x[index])
    torch.testing.assert_close(ours, lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[index]))
