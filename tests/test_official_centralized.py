"""MDCS, MiSLAS, BalPoE and Bal-BCE against a transcription of their official code's arithmetic (issue 10 §1).

Each ``official_*`` function below transcribes (does not import or copy) the named official file on seeded
random inputs; fedlt's method must give the same numbers.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedlt.centralized as C
from fedlt.centralized.run import centralized_optim, stage2_optim
from fedlt.config import load_config
from fedlt.data.augment import random_rotation
from fedlt.losses import bal_bce_loss, mixup_cutmix_batch
from fedlt.registry import CENTRALIZED
from fedlt.train import TensorData, make_optimizer, train

# CIFAR-10-LT at IF 100 (n_c = 5000·0.01^(c/9), floored): the class counts of the official loaders
CIFAR10_LT_100 = np.array([int(5000 * 0.01 ** (c / 9)) for c in range(10)])


def method(name: str, counts, *overrides: str):
    cfg = load_config(None, ["mode=centralized", f"centralized.method={name}", *overrides])
    return CENTRALIZED.get(name)(cfg, np.asarray(counts))


class FixedExperts(nn.Module):
    """A stand-in multi-expert model whose ``expert_logits`` are fixed (M, 2B, C) logits."""

    def __init__(self, z: torch.Tensor) -> None:
        super().__init__()
        self.z = z

    def expert_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.z


# ----------------------------------------------------------------------------------------------------- MDCS


def official_mdcs_loss(logits: torch.Tensor, target_2b: torch.Tensor, cls_num_list, epoch: int) -> torch.Tensor:
    """fistyee/MDCS model/loss.py MDCSLoss.forward with extra_info (epoch counted from 1 by base_trainer.py;
    the trainer stacks [view1; view2] and [target; target])."""
    prior = torch.tensor(np.array(cls_num_list)).float()
    num = int(target_2b.shape[0] / 2)
    experts = [logits[0] + torch.log(torch.pow(prior, -0.5) + 1e-9),
               logits[1] + torch.log(torch.pow(prior, 1) + 1e-9),
               logits[2] + torch.log(torch.pow(prior, 2.5) + 1e-9)]
    partial_target = target_2b[:num]
    kl_loss = 0
    for e in experts:
        teacher, student = e[:num, :], e[num:, :]
        t_soft = F.softmax(teacher, dim=1).detach()
        s_log = F.log_softmax(student, dim=1)
        _, t_index = torch.max(F.softmax(teacher, dim=1).detach(), dim=1)
        keep = t_index == partial_target
        if torch.sum(keep) > 0:
            kl_loss = kl_loss + F.kl_div(s_log[keep], t_soft[keep], reduction="batchmean")
    loss = 0.6 * kl_loss * min(epoch / 20, 1.0)
    for e in experts:
        loss = loss + F.cross_entropy(e, target_2b)
    return loss


@pytest.mark.parametrize("epoch", [1, 7, 20, 300])
def test_mdcs_objective_equals_the_official_loss(epoch):
    g = torch.Generator().manual_seed(epoch)
    b, counts = 16, CIFAR10_LT_100
    y = torch.randint(0, 10, (b,), generator=g)
    z = torch.randn(3, 2 * b, 10, generator=g) * 3
    z[:, :b][:, torch.arange(b), y] += 4  # most teachers confident: the KL term is not empty
    m = method("mdcs", counts, "centralized.epochs=400", "centralized.ramp_fraction=0.05")
    ours = m.objective(epoch - 1)(FixedExperts(z), torch.zeros(2 * b, 3, 4, 4), y)  # fedlt's epochs count from 0
    official = official_mdcs_loss(z, torch.cat([y, y]), counts.tolist(), epoch)
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)
    # the fix: CE is the mean of the two views' CE (the summed version is 2·CE + w·KL)
    assert m.kl_weight(epoch - 1) == pytest.approx(0.6 * min(epoch / 20, 1.0))


def test_mdcs_weak_view_is_the_official_random_rotation():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(12, 3, 32, 32)
    out = random_rotation(x, 15.0, torch.Generator().manual_seed(4), fill=torch.tensor([-1.0, -2.0, -3.0]))
    angles = (torch.rand(12, generator=torch.Generator().manual_seed(4)) * 2 - 1) * 15  # U(−15, 15), the same draw
    assert angles.abs().max() <= 15 and angles.std() > 3
    for i in range(12):  # torchvision RandomRotation(15): nearest, about the centre, fill outside
        ref = TF.rotate(x[i], float(angles[i]), interpolation=TF.InterpolationMode.NEAREST, fill=[-1.0, -2.0, -3.0])
        assert torch.equal(out[i], ref), i
    # the weak view of MDCS: crop/flip, then the rotation, black (pixel 0) outside
    m = method("mdcs", CIFAR10_LT_100, "centralized.cutout=4")
    data = SimpleNamespace(mean=torch.tensor([0.5]), std=torch.tensor([0.25]))
    views = m.augment(data)
    assert isinstance(views, C.TwoViews) and views.rotation == 15.0 and views.black.tolist() == [-2.0]
    both = views(torch.ones(8, 1, 16, 16), torch.Generator().manual_seed(0))
    assert both.shape == (16, 1, 16, 16) and (both[:8] == -2.0).any()  # rotated-in corners are black


# ---------------------------------------------------------------------------------------------------- MiSLAS


def official_stage1_lr(epoch: int, lr: float = 0.1) -> float:
    """dvlab-research/MiSLAS train_stage1.py adjust_learning_rate with cos: False (epoch from 0)."""
    epoch = epoch + 1
    if epoch <= 5:
        return lr * epoch / 5
    if epoch > 180:
        return lr * 0.01
    if epoch > 160:
        return lr * 0.1
    return lr


def official_stage2_lrs(epoch: int, lr: float, num_epochs: int, lr_factor: float) -> tuple[float, float]:
    """train_stage2.py adjust_learning_rate: (classifier group, LWS group) at ``epoch`` (from 0)."""
    cos = 0 + 0.5 * (lr - 0) * (1 + math.cos(epoch / num_epochs * 3.1415926535))
    return lr_factor * cos, 1.00 * cos


def official_label_aware_smoothing(x, target, cls_num_list, smooth_head, smooth_tail):
    """MiSLAS methods.py LabelAwareSmoothing (shape 'concave')."""
    n_1, n_k = max(cls_num_list), min(cls_num_list)
    smooth = smooth_tail + (smooth_head - smooth_tail) * np.sin(
        (np.array(cls_num_list) - n_k) * np.pi / (2 * (n_1 - n_k)))
    smoothing = torch.from_numpy(smooth).float()[target]
    logprobs = F.log_softmax(x, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    return ((1.0 - smoothing) * nll + smoothing * -logprobs.mean(dim=-1)).mean()


MISLAS_CIFAR10_IF100 = "configs/centralized/mislas/cifar10_lt_if100_mislas.yaml"


def test_mislas_stage1_schedule_of_the_shipped_config():
    cfg = load_config(MISLAS_CIFAR10_IF100)
    opt = centralized_optim(cfg)
    for epoch in range(200):
        for frac in (0.0, 0.5, 0.99):
            assert opt.lr_at(epoch + frac, 200) == pytest.approx(official_stage1_lr(epoch)), (epoch, frac)


class Tiny(nn.Module):
    """features (a linear layer + BatchNorm) and a linear classifier, like a SplitModel."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6))
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("shift_bn", [False, True])
def test_mislas_stage2_groups_lrs_and_bn(shift_bn):
    counts = [30, 10, 4]
    m = method("mislas", counts, "centralized.stage2_epochs=3", f"centralized.shift_bn={str(shift_bn).lower()}",
               "centralized.lr_factor=0.5", "centralized.lr=0.1", "centralized.momentum=0",
               "centralized.weight_decay=0")
    torch.manual_seed(0)
    model = Tiny()
    head_before = model.classifier.weight.detach().clone()
    m.start_stage2(model)
    assert torch.equal(model.classifier.inner.weight, head_before)  # stage 2 starts from the stage-1 head
    model.train()
    assert model.features.inner.training is shift_bn  # BN statistics shift only with shift_bn
    opt2 = stage2_optim(m.cfg, m)
    optimizer = make_optimizer(model, opt2, m.stage2_param_groups(model))
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 1]  # (W, b) of the classifier; the scale
    for epoch in range(3):  # per-epoch cosine, held within the epoch
        for frac in (0.0, 0.4, 0.9):
            assert opt2.lr_at(epoch + frac, 3) == pytest.approx(official_stage2_lrs(epoch, 0.1, 3, 0.5)[1])
    # one SGD step (no momentum, no decay) through fedlt's trainer: Δθ = −lr·lr_scale·∇
    labels = torch.tensor([0, 1, 2, 0])
    data = TensorData(torch.randint(0, 255, (4, 1, 4, 4), dtype=torch.uint8), labels, torch.tensor([0.5]),
                      torch.tensor([0.25]), 3)
    w0, s0 = model.classifier.inner.weight.detach().clone(), model.classifier.scales.detach().clone()
    x = (data.images.float() / 255 - 0.5) / 0.25
    loss = m.stage2_objective(0)(model, x, labels)
    gw, gs = torch.autograd.grad(loss, [model.classifier.inner.weight, model.classifier.scales])
    train(model, data, m.stage2_objective(0), opt=opt2, steps=1, generator=torch.Generator().manual_seed(0),
          optimizer=optimizer, start_epoch=0, total_epochs=3)
    lr_head, lr_scale = official_stage2_lrs(0, 0.1, 3, 0.5)
    assert torch.allclose(model.classifier.inner.weight, w0 - lr_head * gw, atol=1e-6)
    assert torch.allclose(model.classifier.scales, s0 - lr_scale * gs, atol=1e-6)


def official_classifier_balancing_stage2_lrs(lr: float, epochs: int) -> list[float]:
    """facebookresearch/classifier-balancing ``run_networks.py`` ``train``: ``CosineAnnealingLR(optimizer,
    num_epochs, eta_min=endlr)`` (``coslr: true``, ``endlr: 0.0`` in ``config/*/cls_crt.yaml``), and
    ``self.model_optimizer_scheduler.step()`` at the start of every epoch, before its batches."""
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, epochs, eta_min=0.0)
    lrs = []
    for _ in range(epochs):
        scheduler.step()  # before the epoch's optimizer steps, as the official
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
    return lrs


@pytest.mark.parametrize("name", ["crt", "lws"])
def test_crt_and_lws_stage2_as_classifier_balancing_trains_it(name):
    """BatchNorm of the frozen backbone in train mode (the official puts every network in train mode each
    epoch; ``fix: true`` only stops gradients), so stage 2 moves its running statistics and the test uses
    them; the cosine stepped before each epoch (the last epoch at lr 0); class-aware batches of 4 per class."""
    epochs = 10 if name == "crt" else 5
    m = method(name, [30, 10, 4], f"centralized.stage2_epochs={epochs}", "centralized.lr=0.2")
    opt2 = stage2_optim(m.cfg, m)
    for epoch, official in enumerate(official_classifier_balancing_stage2_lrs(0.2, epochs)):
        for frac in (0.0, 0.5, 0.99):
            assert opt2.lr_at(epoch + frac, epochs) == pytest.approx(official, abs=1e-12), (epoch, frac)
    assert opt2.lr_at(epochs - 1, epochs) == 0.0
    torch.manual_seed(0)
    model = Tiny()
    m.start_stage2(model)
    assert model.train().features.inner.training
    mean_before = model.features.inner[2].running_mean.clone()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    data = TensorData(torch.randint(0, 255, (8, 1, 4, 4), dtype=torch.uint8), labels, torch.tensor([0.5]),
                      torch.tensor([0.25]), 3)
    train(model, data, m.stage2_objective(0), opt=opt2, steps=1, generator=torch.Generator().manual_seed(0),
          sampler=m.stage2_sampler(), start_epoch=0, total_epochs=epochs)
    assert not torch.equal(model.features.inner[2].running_mean, mean_before)
    assert m.stage2_sampler().samples_per_class == 4
    off = method(name, [30, 10, 4], "centralized.shift_bn=false")
    model = Tiny()
    off.start_stage2(model)
    assert not model.train().features.inner.training


def test_mislas_stage2_loss_of_the_shipped_config():
    cfg = load_config(MISLAS_CIFAR10_IF100)
    assert (cfg.centralized.eps_head, cfg.centralized.eps_tail, cfg.centralized.shift_bn,
            cfg.centralized.lr_factor) == (0.3, 0.0, False, 0.5)
    m = CENTRALIZED.get("mislas")(cfg, CIFAR10_LT_100)
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(32, 10, generator=g) * 2, torch.randint(0, 10, (32,), generator=g)
    ours = m.stage2_objective(0)(nn.Identity(), z, y)
    assert ours.item() == pytest.approx(official_label_aware_smoothing(z, y, CIFAR10_LT_100.tolist(), 0.3, 0.0).item(),
                                        rel=1e-6)


# ---------------------------------------------------------------------------------------------------- BalPoE


def official_bs_expert_loss(logits, targets, cls_num_list, tau_list=(0, 1.0, 2.0), eps=1e-9):
    """emasa/BalPoE-CalibratedLT model/loss.py BSExpertLoss.forward with extra_info."""
    prior = torch.tensor(cls_num_list).float()
    prior = prior / prior.sum()
    loss = 0.0
    for idx, tau in enumerate(tau_list):
        loss = loss + F.cross_entropy(logits[idx] + tau * torch.log(prior + eps), targets)
    return loss / len(tau_list)


def test_balpoe_loss_and_full_width_experts():
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(3, 24, 10, generator=g) * 2, torch.randint(0, 10, (24,), generator=g)
    m = method("balpoe", CIFAR10_LT_100)
    ours = m.objective(0)(FixedExperts(z), torch.zeros(24, 3, 4, 4), y)
    assert ours.item() == pytest.approx(official_bs_expert_loss(z, y, CIFAR10_LT_100.tolist()).item(), rel=1e-6)
    # reduce_dimension: false in every official CIFAR config -> layer2/layer3 of 32/64 channels; MDCS's are 24/48
    exp = SimpleNamespace(num_classes=10, in_channels=3)
    for name, widths in (("balpoe", (32, 64)), ("mdcs", (24, 48))):
        for base, blocks in (("resnet32", 5), ("resnet8", 1)):  # resnet8_experts: fedlt's CPU-budget depth
            model = method(name, CIFAR10_LT_100, f"model.name={base}").build_model(exp)
            expert = model.experts[0]
            convs = [mod for mod in expert.features.modules() if isinstance(mod, nn.Conv2d)]
            assert (convs[0].out_channels, convs[-1].out_channels, model.feature_dim) == (*widths, widths[1]), name
            assert sum(c.kernel_size == (3, 3) for c in convs) == 2 * 2 * blocks  # layer2 + layer3, 2 convs/block


@pytest.mark.parametrize("data, autoaugment", [("cifar10", False), ("cifar100", True)])
def test_balpoe_long_recipe_configs(data, autoaugment):
    """configs/mixup/long_training: warmup_epoch 10, "randaugm": true without cutout. The CIFAR-10 loader passes
    that boolean to cifar_aug_plus, which adds AutoAugment only for autoaugm == 'auto' (crop/flip alone); the
    CIFAR-100 loader passes 'auto'."""
    cfg = load_config(f"configs/centralized/{data}_lt_balpoe.yaml")
    c = cfg.centralized
    assert (c.warmup_epochs, c.autoaugment, c.cutout, c.reduce_dimension) == (10, autoaugment, 0, False)
    aug = CENTRALIZED.get("balpoe")(cfg, CIFAR10_LT_100).augment(
        SimpleNamespace(mean=torch.tensor([0.5] * 3), std=torch.tensor([0.25] * 3)))
    assert isinstance(aug, C.StrongView) == autoaugment and getattr(aug, "cutout", 0) == 0


# --------------------------------------------------------------------------------------------------- Bal-BCE


def official_bal_bce(x, target, cls_num, smoothing=0.1):
    """XuZhengzhuo/LiVT util/loss.py BCE_loss(type='Bal'): soft (B, C) targets as given, labels one-hot
    smoothed (off ε/C, on 1 − ε + ε/C); x + log(π) − log(1 − π); C·BCE mean."""
    if target.shape != x.shape:
        off = smoothing / x.shape[-1]
        target = torch.full((len(target), x.shape[-1]), off).scatter_(1, target.long().view(-1, 1), 1 - smoothing + off)
    pi = torch.Tensor(cls_num) / torch.sum(torch.Tensor(cls_num))
    x = x + (torch.log(pi) - torch.log(1 - pi))
    return x.shape[-1] * F.binary_cross_entropy_with_logits(x, target, reduction="mean")


def official_timm_mixup(x, target, num_classes, rs, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                        smoothing=0.1):
    """timm.data.Mixup (mode 'batch', correct_lam=True, cutmix_minmax None) as LiVT builds it; ``rs`` stands in
    for np.random, drawing in timm's order (rand, rand, beta; then randint cy, randint cx for the box)."""
    lam, use_cutmix = 1.0, False
    if rs.random() < prob:
        use_cutmix = rs.random() < switch_prob
        lam = float(rs.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rs.beta(mixup_alpha, mixup_alpha))
    x = x.clone()
    if lam != 1.0:
        if use_cutmix:
            img_h, img_w = x.shape[-2:]
            ratio = np.sqrt(1 - lam)
            cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
            cy, cx = rs.integers(0, img_h), rs.integers(0, img_w)
            yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
            xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
            lam = 1.0 - (yh - yl) * (xh - xl) / float(img_h * img_w)
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
    off, on = smoothing / num_classes, 1.0 - smoothing + smoothing / num_classes
    y1 = torch.full((len(target), num_classes), off).scatter_(1, target.view(-1, 1), on)
    y2 = torch.full((len(target), num_classes), off).scatter_(1, target.flip(0).view(-1, 1), on)
    return x, y1 * lam + y2 * (1.0 - lam)


def test_bal_bce_starts_at_the_prior_not_shifted_twice():
    m = method("bal_bce", CIFAR10_LT_100, "model.name=small_cnn")
    model = m.build_model(SimpleNamespace(num_classes=10, in_channels=3))
    assert torch.count_nonzero(model.classifier.bias) == 0  # LiVT's head bias: 0 (only head.weight re-initialised)
    model.classifier.weight.data.zero_()
    z = model(torch.randn(2, 3, 8, 8))
    pi = CIFAR10_LT_100 / CIFAR10_LT_100.sum()
    p = torch.sigmoid(z + torch.as_tensor(np.log(pi) - np.log1p(-pi), dtype=torch.float32))
    assert p[0, 0].item() == pytest.approx(0.403, abs=1e-3)  # the head class starts at π_0 = 5000/12406, not 0.07
    assert p[0].tolist() == pytest.approx(pi.tolist(), rel=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_bal_bce_with_livt_mixup_cutmix_soft_targets(seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    ours_x, ours_t, lam = mixup_cutmix_batch(x, y, 10, np.random.default_rng(seed), 0.8, 1.0, 1.0, 0.5, 0.1)
    ref_x, ref_t = official_timm_mixup(x, y, 10, np.random.default_rng(seed))
    assert torch.allclose(ours_x, ref_x, atol=1e-6) and torch.allclose(ours_t, ref_t, atol=1e-7)
    assert torch.allclose(ours_t.sum(1), torch.ones(8)) and 0 < lam <= 1
    z = torch.randn(8, 10, generator=g)
    assert bal_bce_loss(z, ours_t, CIFAR10_LT_100).item() == pytest.approx(
        official_bal_bce(z, ref_t, CIFAR10_LT_100.tolist()).item(), rel=1e-5)
    # through the method: the objective mixes the batch with its own rng and feeds the soft targets to the loss
    m = method("bal_bce", CIFAR10_LT_100, "centralized.mixup_alpha=0.8", "centralized.cutmix_alpha=1.0")
    m.rng = np.random.default_rng(seed)
    head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    expected = official_bal_bce(head(ref_x), ref_t, CIFAR10_LT_100.tolist())
    assert m.objective(0)(head, x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bal_bce_without_mixup_is_the_label_smoothed_loss():
    g = torch.Generator().manual_seed(9)
    z, y = torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    assert bal_bce_loss(z, y, CIFAR10_LT_100).item() == pytest.approx(
        official_bal_bce(z, y, CIFAR10_LT_100.tolist()).item(), rel=1e-6)
