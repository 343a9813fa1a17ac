"""SHIKE (jinyan-06/SHIKE) against a transcription of its official arithmetic: the DKT loss and the stage-2
balanced loss (``cifarTrain.py`` ``mix_outputs``), the lr schedule (``utils.py`` ``CosineAnnealingLRWarmup``
as ``main`` builds it for both stages) and the depth-fused experts (``networks.py`` ``ResNet_MoE.forward``);
the stage-2 freeze, the config checks and a short run through both stages with a resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_centralized_methods import tiny_cfg, tiny_experiment

import fedlt.centralized as C
import fedlt.centralized.run as R
from conftest import resumed_after_cut
from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.losses.shike import hardest_negative_teacher, shike_balanced_loss, shike_loss
from fedlt.models.base import NormedLinear
from fedlt.models.shike import resnet32_shike, small_cnn_shike
from fedlt.registry import CENTRALIZED
from fedlt.rundir import RunDir
from fedlt.train import make_optimizer, train

pytestmark = pytest.mark.filterwarnings("ignore:reduction. .mean. divides the total loss")


def method(*overrides: str, counts=(40, 16, 8, 4)):
    cfg = load_config(None, ["mode=centralized", "centralized.method=shike", *overrides])
    return CENTRALIZED.get("shike")(cfg, np.asarray(counts))


# ------------------------------------------------------------------------------------------------ the losses


def official_mix_outputs(outputs, labels, balance=False, label_dis=None):
    """cifarTrain.py mix_outputs, transcribed (labels one-hot; F.softmax without dim on 2-D input is dim 1;
    F.kl_div's default reduction is 'mean'); returns the loss."""
    logits_rank = torch.stack(outputs, 1)
    max_tea, _ = torch.max(logits_rank, dim=1)
    non_target_labels = torch.ones_like(labels) - labels
    avg_logits = torch.sum(logits_rank, dim=1) / len(outputs)
    non_target_logits = (-30 * labels) + avg_logits * non_target_labels
    _, hn_idx = torch.max(non_target_logits, dim=1)
    hardest_idx = torch.zeros_like(labels)
    hardest_idx.scatter_(1, hn_idx.view(-1, 1), 1)
    hardest_logit = non_target_logits * hardest_idx
    rest_nt_logits = max_tea * (1 - hardest_idx) * (1 - labels)
    reformed_nt = rest_nt_logits + hardest_logit
    reformed_non_targets = [F.softmax(o * (1 - labels) + (-30 * labels), dim=1) for o in outputs]
    loss = 0.0
    if balance:
        prior = torch.tensor(label_dis, dtype=torch.float).unsqueeze(0).expand(labels.shape[0], -1)
        for o in outputs:
            loss += torch.mean(torch.sum(-labels * F.log_softmax(o + prior.log(), dim=1), dim=1))
        return loss
    for i in range(len(outputs)):
        loss += torch.mean(torch.sum(-labels * F.log_softmax(outputs[i], dim=1), dim=1))
        loss += 10.0 * F.kl_div(torch.log(reformed_non_targets[i]), F.softmax(reformed_nt, dim=1), reduction="mean")
        for j in range(len(outputs)):
            if i != j:
                loss += F.kl_div(F.log_softmax(outputs[i], dim=1), F.softmax(outputs[j], dim=1), reduction="mean")
    return loss


def test_hardest_negative_teacher_by_hand():
    # 2 experts, 4 classes, label 0: mean = (4, 1, 2, −1) → hardest negative 2 (mean 2); others take the max
    z = torch.tensor([[[5.0, 3.0, 1.0, -2.0]], [[3.0, -1.0, 3.0, 0.0]]])
    assert hardest_negative_teacher(z, torch.tensor([0])).tolist() == [[0.0, 3.0, 2.0, 0.0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dkt_loss_and_its_gradient_equal_the_official(seed):
    g = torch.Generator().manual_seed(seed)
    m, b, c = 3, 8, 10
    z = ((torch.rand(m, b, c, generator=g) * 2 - 1) * 30).requires_grad_(True)  # cosine logits, s = 30
    y = torch.randint(0, c, (b,), generator=g)
    ours = shike_loss(z, y)
    z_off = z.detach().clone().requires_grad_(True)
    official = official_mix_outputs(list(z_off), F.one_hot(y, c).float())
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)
    ours.backward(), official.backward()
    assert torch.allclose(z.grad, z_off.grad, atol=1e-6)  # no teacher detached, as in the official
    # the suppression term matters: without it the loss differs by 10·KL̄ > 0
    assert shike_loss(z.detach(), y, hns_weight=0.0).item() < ours.item() - 1e-3


def test_stage2_loss_equals_the_official_balanced_loss():
    g = torch.Generator().manual_seed(3)
    counts = np.array([int(500 * 0.01 ** (i / 9)) for i in range(10)])
    z = torch.randn(3, 16, 10, generator=g) * 10
    y = torch.randint(0, 10, (16,), generator=g)
    official = official_mix_outputs(list(z), F.one_hot(y, 10).float(), balance=True, label_dis=counts)
    m = method(counts=counts)
    assert shike_balanced_loss(z, y, m.log_pi).item() == pytest.approx(official.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- the schedule


def official_lr(last_epoch: int, t_max: int, warmup_epochs: int = 5, base_lr: float = 0.05,
                warmup_lr: float = 0.15) -> float:
    """utils.py CosineAnnealingLRWarmup.get_lr (η_min = 0, one base lr), at the scheduler's last_epoch."""
    if last_epoch < warmup_epochs:
        return ((warmup_lr - base_lr) / (warmup_epochs - 1) * (last_epoch - 1) + base_lr) / base_lr * base_lr
    return (warmup_lr * (1 + math.cos(math.pi * (last_epoch - warmup_epochs) / (t_max - warmup_epochs))) / 2
            / base_lr * base_lr)


def test_both_stages_follow_the_official_schedules():
    cfg = load_config("configs/centralized/cifar_lt_shike.yaml")
    m = CENTRALIZED.get("shike")(cfg, np.arange(1, 101))
    opt1, opt2 = m.optim(R.centralized_optim(cfg), 1), m.optim(R.stage2_optim(cfg, m), 2)
    # main(): scheduler_feat (T_max = 200 − 20, warm-up to 0.15), scheduler_crt (T_max = 20, warm-up to 0.1);
    # epoch e trains at last_epoch = e (the constructor steps once), held for the whole epoch
    for e in range(180):
        for frac in (0.0, 0.5, 0.99):
            assert opt1.lr_at(e + frac, 180) == pytest.approx(official_lr(e, 180)), e
    for e in range(20):
        assert opt2.lr_at(e + 0.5, 20) == pytest.approx(official_lr(e, 20, warmup_lr=0.1)), e
    assert [round(opt1.lr_at(e, 180), 4) for e in range(6)] == [0.025, 0.05, 0.075, 0.1, 0.125, 0.15]
    assert opt1.batch_size == 128 and opt1.weight_decay == 5e-4 and opt1.momentum == 0.9


# ------------------------------------------------------------------------------------------------- the model


def official_forward(model, x):
    """networks.py ResNet_MoE.forward, on fedlt's modules: out_i = s·cos(GAP(layer3_i(out2) ⊙
    shallow_i(shallow_outs[i % 2])))."""
    out1 = model.stem.stages[0](x)
    out2 = model.stem.stages[1](out1)
    shallow_outs = [out1, out2]
    outs = []
    for i, e in enumerate(model.experts):
        fused = e.deep(out2) * e.shallow(shallow_outs[i % len(shallow_outs)])
        h = F.avg_pool2d(fused, fused.size()[3]).view(fused.size(0), -1)
        outs.append(30 * F.normalize(h, dim=1).mm(F.normalize(e.classifier.weight, dim=0)))
    return torch.stack(outs)


def test_depth_fused_resnet32_is_the_official_model():
    torch.manual_seed(0)
    model = resnet32_shike(10)
    # networks.resnet32(num_classes=10, use_norm=True, num_exps=3): 1,240,528 parameters besides rt_classifiers
    assert sum(p.numel() for p in model.parameters()) == 1_240_528
    kinds = [[type(mod).__name__ for mod in e.shallow] for e in model.experts]
    assert kinds == [["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"], ["Conv2d", "BatchNorm2d", "ReLU"],
                     ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]]  # exp_depth [2, 1, 2]
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):
        model.train(mode)
        assert torch.allclose(model.expert_logits(x), official_forward(model, x), atol=1e-4)
    assert torch.allclose(model(x), model.expert_logits(x).mean(0))
    small = small_cnn_shike(10, 1)
    assert small.expert_logits(torch.randn(2, 1, 28, 28)).shape == (3, 2, 10)


# ------------------------------------------------------------------------------------------------- stage 2


def test_stage2_trains_only_new_cosine_heads_and_keeps_bn_moving():
    torch.set_num_threads(1)
    m = method("model.name=resnet32")
    model = resnet32_shike(4, 1)  # BatchNorm throughout
    old = [e.classifier for e in model.experts]
    m.start_stage2(model)
    assert all(isinstance(e.classifier, NormedLinear) and e.classifier is not h for e, h in zip(model.experts, old))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for e in model.experts for p in e.classifier.parameters()}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "classifier" not in k}
    data = tiny_experiment().tensor_data()
    opt = m.optim(R.stage2_optim(m.cfg, m), 2)
    train(model, data, m.stage2_objective(0), opt=opt, epochs=1.0, generator=torch.Generator().manual_seed(0),
          optimizer=make_optimizer(model, opt), total_epochs=20)
    after = model.state_dict()
    weights = [k for k in frozen if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(frozen[k], after[k]) for k in weights)  # no weight decay on the frozen model
    assert not torch.equal(frozen["stem.stages.0.1.running_mean"], after["stem.stages.0.1.running_mean"])
    assert not torch.equal(old[0].weight, model.experts[0].classifier.weight)


# --------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("overrides, match", [
    (["model.name=resnet8"], r"needs a depth-fused multi-expert model, and 'resnet8_shike' is not registered"),
    (["centralized.schedule=step", "centralized.milestones=[5]"], "leave centralized.schedule at cosine"),
    (["centralized.warmup_epochs=1"], "warmup_epochs"),
    (["centralized.warmup_epochs=2", "centralized.lr=0.05"], r"starts stage 1 at lr -0.05"),
    (["centralized.epochs=5"], "whole centralized.epochs above centralized.warmup_epochs"),
    (["centralized.epochs=10", "centralized.stage2_epochs=3"], "must exceed centralized.stage2_warmup_epochs"),
])
def test_bad_configs_are_refused(overrides, match):
    with pytest.raises(FedLTError, match=match):
        load_config(None, ["mode=centralized", "centralized.method=shike", "model.name=resnet32", *overrides])


def test_two_stages_run_and_resume(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("shike", "centralized.epochs=2", "centralized.warmup_epochs=0", "centralized.warmup_lr=0.05",
                   "centralized.stage2_epochs=2", "centralized.stage2_warmup_epochs=0", "centralized.cutout=4")
    full = C.run_centralized(cfg, RunDir(tmp_path / "full"))
    assert math.isfinite(full["accuracy"]) and full["stage2_epochs"] == 2
    resumed, _ = resumed_after_cut(C.run_centralized, cfg, RunDir(tmp_path / "cut"), 3, monkeypatch)
    assert resumed["accuracy"] == full["accuracy"] and resumed["loss"] == pytest.approx(full["loss"])
    no_stage2 = CENTRALIZED.get("shike")(tiny_cfg("shike", "centralized.stage2_epochs=0",
                                                  "centralized.warmup_epochs=0"), np.array([3, 1]))
    assert not no_stage2.two_stage and isinstance(no_stage2.optim(R.centralized_optim(no_stage2.cfg), 1).lr_at(0, 1),
                                                  float)
