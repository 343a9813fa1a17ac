"""Centralized zoo II, losses and re-weighting: EQL (tztztztztz/eql.detectron2) and AREA (xiaohua-chen/AREA), each
against a transcription of the official arithmetic on hand-made inputs; a 1-epoch centralized smoke run; and one
federated round (in-process engine) with the method as the client objective."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_centralized_methods import tiny_cfg, tiny_experiment
from test_federated_methods import simulate, tiny_config, tiny_lists  # noqa: F401  (fixture)

import fedlt.centralized as C
import fedlt.centralized.run as R
from conftest import resumed_after_cut
from fedlt.centralized.base import StrongView
from fedlt.losses.area import area_class_weights, area_weights, batch_effective_areas, class_feature_means
from fedlt.losses.equalization import eql_bias_init, equalization_loss, softmax_equalization_loss
from fedlt.registry import CENTRALIZED, CLIENTS, LOSSES
from fedlt.rundir import RunDir


# --------------------------------------------------------------------------- EQL
def official_eql_loss(pred_class_logits, gt_classes, freq_info, lambda_):
    """EQLFastRCNNOutputs.eql_loss of projects/EQL/eql/fast_rcnn.py, transcribed (background index n_c)."""
    n_i, n_c = pred_class_logits.size()
    target = pred_class_logits.new_zeros(n_i, n_c + 1)
    target[torch.arange(n_i), gt_classes] = 1
    target = target[:, :n_c]
    exclude = (gt_classes != n_c).float().view(n_i, 1).expand(n_i, n_c)
    threshold = pred_class_logits.new_zeros(n_c)
    threshold[freq_info < lambda_] = 1
    threshold = threshold.view(1, n_c).expand(n_i, n_c)
    eql_w = 1 - exclude * threshold * (1 - target)
    cls_loss = F.binary_cross_entropy_with_logits(pred_class_logits, target, reduction="none")
    return torch.sum(cls_loss * eql_w) / n_i


def test_eql_default_lambda_is_the_official_cfg_value():
    """projects/EQL/eql/cfg.py ``cfg.MODEL.ROI_HEADS.LAMBDA = 0.00177`` (Base-EQL-RCNN-FPN.yaml ``LAMBDA: 0.00177``)
    with the official ``threshold[freq_info < lambda_] = 1``: a class of frequency 1.765e-3 is a tail class (the
    paper's printed 1.76e-3 would not make it one)."""
    from fedlt.centralized.eql import EQL
    from fedlt.losses.equalization import EQL_LAMBDA, eql_weights

    assert EQL_LAMBDA == 0.00177 and EQL.Options(method="eql").lam == 0.00177
    freq = torch.tensor([1 - 1.765e-3, 1.765e-3])
    official = torch.zeros(2)
    official[freq < 0.00177] = 1
    assert official.tolist() == [0, 1]
    w = eql_weights(torch.tensor([0]), 2, freq, EQL_LAMBDA)
    assert w.tolist() == [[1.0, 0.0]]  # the tail class's negative term is off, as in the official code
    assert eql_weights(torch.tensor([0]), 2, freq, 1.76e-3).tolist() == [[1.0, 1.0]]


def test_eql_matches_the_official_loss_and_silences_tail_negatives():
    counts = torch.tensor([50, 30, 15, 5])  # f = (0.5, 0.3, 0.15, 0.05)
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.5], [-0.3, 0.7, 1.2, -2.0], [0.1, 0.2, -0.4, 0.9]], requires_grad=True)
    y = torch.tensor([0, 2, 3])
    lam = 0.2  # classes 2 and 3 are tail
    ours = equalization_loss(logits, y, counts, lam)
    official = official_eql_loss(logits.detach(), y, counts / counts.sum(), lam)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    ours.backward()
    g = logits.grad
    assert g[0, 2] == 0 and g[0, 3] == 0 and g[1, 3] == 0  # negatives of the tail classes: no gradient
    assert g[1, 2] != 0 and g[2, 3] != 0  # their positives do
    assert g[1, 0] != 0 and g[2, 1] != 0  # head negatives do
    # λ = 0 is the plain sigmoid BCE summed over classes
    plain = F.binary_cross_entropy_with_logits(logits.detach(), F.one_hot(y, 4).float(), reduction="sum") / 3
    assert equalization_loss(logits.detach(), y, counts, 0.0).item() == pytest.approx(plain.item(), rel=1e-6)


def transcribed_seql(inputs, targets, num_class_list, lam, gamma, rand):
    """SEQL.forward of zhangyongshun/BagofTricks-LT lib/loss/loss_impl/equalization_loss.py, transcribed (``rand``
    replaces its ``torch.rand(onehot_label.size())``)."""
    t_lambda = (num_class_list / num_class_list.sum()) < lam
    onehot = F.one_hot(targets, inputs.shape[1]).float()
    beta = rand < gamma
    w = 1 - beta * t_lambda * (1 - onehot)
    p = torch.exp(inputs) / (w * torch.exp(inputs)).sum(axis=1, keepdims=True)
    return F.nll_loss(torch.log(p), targets)


def test_softmax_eql_matches_the_transcription_and_drops_tail_negatives():
    counts = torch.tensor([50.0, 30, 15, 5])  # f = (0.5, 0.3, 0.15, 0.05): classes 2, 3 are tail at λ = 0.2
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.5], [-0.3, 0.7, 1.2, -2.0], [0.1, 0.2, -0.4, 0.9]], requires_grad=True)
    y = torch.tensor([0, 2, 3])
    rand = torch.rand((3, 4), generator=torch.Generator().manual_seed(5))
    ours = softmax_equalization_loss(logits, y, counts, 0.2, 0.6, torch.Generator().manual_seed(5))
    assert ours.item() == pytest.approx(transcribed_seql(logits.detach(), y, counts, 0.2, 0.6, rand).item(), rel=1e-6)
    # γ = 1: every tail negative leaves the denominator, so it gets no gradient; γ = 0 is plain CE
    always = softmax_equalization_loss(logits, y, counts, 0.2, 1.0)
    logits.grad = None
    always.backward()
    g = logits.grad
    assert g[0, 2] == 0 and g[0, 3] == 0 and g[1, 3] == 0 and g[1, 2] != 0 and g[2, 3] != 0 and g[1, 0] != 0
    hand = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(-1.0)))  # sample 0: only classes 0 and 1 remain
    assert softmax_equalization_loss(logits[:1].detach(), y[:1], counts, 0.2, 1.0).item() == pytest.approx(hand)
    ce = F.cross_entropy(logits.detach(), y)
    assert softmax_equalization_loss(logits.detach(), y, counts, 0.2, 0.0).item() == pytest.approx(ce.item())
    # large logits: the log-sum-exp stays finite where exp(z) overflows
    big = softmax_equalization_loss(logits.detach() * 100, y, counts, 0.2, 0.0)
    assert big.item() == pytest.approx(F.cross_entropy(logits.detach() * 100, y).item(), rel=1e-5)


def test_softmax_eql_epoch_draws_are_reproducible():
    method = CENTRALIZED.get("seql")(tiny_cfg("seql", "centralized.lam=0.2"), np.array([50, 30, 15, 5]))
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    model = torch.nn.Identity()
    a, b, c = method.objective(1)(model, x, y), method.objective(1)(model, x, y), method.objective(2)(model, x, y)
    assert a.item() == b.item()  # the same epoch draws the same β (a resumed run too)
    assert method.loss_options(1)["seed"] != method.loss_options(2)["seed"] and math.isfinite(c.item())


def test_eql_head_starts_at_the_prior_probability():
    assert eql_bias_init(0.001) == pytest.approx(-math.log(999))
    method = CENTRALIZED.get("eql")(tiny_cfg("eql"), np.array([40, 16, 8, 4]))
    model = method.build_model(tiny_experiment())
    assert torch.allclose(model.classifier.bias, torch.full((4,), -math.log(999)))
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.2)
    again = CENTRALIZED.get("eql")(tiny_cfg("eql"), np.array([40, 16, 8, 4])).build_model(tiny_experiment())
    assert torch.equal(model.classifier.weight, again.classifier.weight)  # seeded


# --------------------------------------------------------------------------- AREA
def official_area_weights(batches, cls_num_list, feature_mean):
    """calculate_eff_weight of AREA_cifar.py, transcribed (numpy indexing, per-class loop, Eq. 14)."""
    class_num = len(cls_num_list)
    eff_all = torch.zeros(class_num)
    for features, target in batches:
        mu = feature_mean[target]
        feature_bz = features - mu
        index = torch.unique(target)
        index2 = target.numpy()
        eff = torch.zeros(class_num)
        for i in range(len(index)):
            index3 = torch.squeeze(torch.from_numpy(np.argwhere(index2 == index[i].item())))
            fj = feature_bz[index3]
            if fj.dim() == 1:
                eff[index[i]] = 1
            else:
                ab = torch.matmul(fj, fj.transpose(0, 1))
                a_norm = torch.unsqueeze(torch.sqrt(torch.mul(fj, fj).sum(axis=1)), 1)
                length = torch.mul(a_norm, a_norm.transpose(0, 1))
                length[length == 0] = 1
                r = torch.div(ab, length)
                num = fj.size(0)
                a, b = torch.ones(1, num) / num, torch.ones(num, 1) / num
                eff[index[i]] = 1 / torch.matmul(torch.matmul(a, r), b)
        eff_all = eff_all + eff
    weights = torch.where(eff_all > 0, 1 / eff_all, eff_all)
    return weights / torch.sum(weights) * class_num


def official_feature_mean(batches, cls_num_list, dim):
    """get_feature_mean of AREA_cifar.py, transcribed."""
    total = torch.zeros(len(cls_num_list), dim)
    for features, target in batches:
        for out, label in zip(features, target):
            total[label] = total[label] + out
    return total / torch.tensor(cls_num_list).unsqueeze(1)


def test_area_effective_area_by_hand():
    means = torch.zeros(3, 2)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    eff = batch_effective_areas(h, y, means)
    # class 0: orthogonal pair, aᵀRa = (1+1)/4 -> 2; class 1: two parallel + one zero vector: R sums to 4 of 9
    # -> 9/4; class 2: one sample -> 1
    assert eff.tolist() == pytest.approx([2.0, 9 / 4, 1.0])
    # 1/A = (1/2, 1/4, 0), Σ = 3/4, × C = 3 (the absent class still counts in C, as in Eq. 14 of the code)
    assert area_weights(torch.tensor([2.0, 4.0, 0.0])).tolist() == pytest.approx([2.0, 1.0, 0.0])


def test_area_weights_match_the_official_two_passes():
    g = torch.Generator().manual_seed(0)
    counts = [7, 4, 2, 1]
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    feats = torch.randn(len(labels), 5, generator=g)
    perms = [torch.randperm(len(labels), generator=g) for _ in range(2)]

    def batches_of(perm):
        return [(feats[perm[s:s + 4]], labels[perm[s:s + 4]]) for s in range(0, len(perm), 4)]

    means = official_feature_mean(batches_of(perms[0]), counts, 5)
    assert torch.allclose(class_feature_means(iter(batches_of(perms[0])), 4, torch.tensor(counts)), means, atol=1e-6)
    expected = official_area_weights(batches_of(perms[1]), counts, means)
    passes = iter([batches_of(perms[0]), batches_of(perms[1])])
    ours = area_class_weights(lambda: iter(next(passes)), 4, torch.tensor(counts))
    assert torch.allclose(ours, expected, atol=1e-5)
    assert ours.sum().item() == pytest.approx(4.0)


def test_area_reweights_from_its_epoch(monkeypatch):
    cfg = tiny_cfg("area", "centralized.epochs=4", "centralized.area_fraction=0.5")
    method = CENTRALIZED.get("area")(cfg, np.array([40, 16, 8, 4]))
    exp = tiny_experiment()
    model = method.build_model(exp)
    data = exp.tensor_data("train", device=torch.device("cpu"))
    method.begin_epoch(model, data, None, 1)
    assert method.weights is None
    method.begin_epoch(model, data, None, 2)
    w = method.weights
    assert w.shape == (4,) and w.sum().item() == pytest.approx(4.0) and (w > 0).all()
    x, y = torch.randn(6, 1, 12, 12), torch.tensor([0, 0, 1, 2, 3, 3])
    expected = F.cross_entropy(model(x), y, weight=w)
    assert method.objective(2)(model, x, y).item() == pytest.approx(expected.item(), rel=1e-6)


# --------------------------------------------------------------------------- runs
@pytest.mark.parametrize("method,extra", [("eql", ["centralized.lam=0.2"]), ("area", ["centralized.area_fraction=0"]),
                                          ("seql", ["centralized.lam=0.2"])])
def test_smoke_one_epoch(method, extra, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    summary = C.run_centralized(tiny_cfg(method, *extra), RunDir(tmp_path))
    for key in ("accuracy", "balanced_accuracy", "loss", "ece"):
        assert math.isfinite(summary[key]), key
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]


def test_registered():
    assert {"eql", "seql", "area"} <= set(CENTRALIZED) and {"eql", "seql"} <= set(LOSSES) and "area" in CLIENTS


@pytest.mark.parametrize("overrides", [["client.name=local_loss", "client.loss=eql", "client.loss_options={lam: 0.1}"],
                                       ["client.name=local_loss", "client.loss=seql",
                                        "client.loss_options={lam: 0.1, drop_prob: 0.9}"],
                                       ["client.name=area"]], ids=["local_loss_eql", "local_loss_seql", "area_client"])
def test_one_federated_round(tiny_lists, tmp_path, overrides):  # noqa: F811
    cfg = tiny_config(tiny_lists, "federation.rounds=1", *overrides)
    summary, rows = simulate(cfg, tmp_path / "run")
    assert len(rows) == 1 and math.isfinite(rows[0]["accuracy"])
    assert all(math.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)


# --------------------------------------------------------------------------- CC-SAM
def official_cc_sam_step(model, x, y, class_ratio, flat_ratio, noise_ratio):
    """train() of zzpustc/CC-SAM train_cifar.py for one batch, transcribed (no mixup, no DataParallel): the loss,
    after which ``backward`` leaves the official gradients in the classifier."""
    from copy import deepcopy

    fea = model.features(x)
    o = model.classifier(fea)
    loss_ori = F.cross_entropy(o, y, reduction="none")
    y_in = y.numpy()
    params_num = sum(p.numel() for p in model.classifier.parameters())
    disturb_params = list(model.classifier.parameters())
    origin_params = deepcopy(disturb_params)
    grad_list = {}
    for y_tmp in np.unique(y_in):
        idx = np.where(y_in == y_tmp)
        grad_list[str(y_tmp)] = list(torch.autograd.grad(loss_ori[idx].mean(), disturb_params, retain_graph=True))
    param_norm = torch.norm(torch.stack([p.norm(p=2) for p in disturb_params]), p=2) + 1e-12
    loss_list, noises = [], {}
    for y_tmp in np.unique(y_in):
        idx = np.where(y_in == y_tmp)
        noises[int(y_tmp)] = []
        for param_c, param in enumerate(disturb_params):
            grad_c = grad_list[str(y_tmp)][param_c]
            grad_c_norm = torch.norm(grad_c)
            rho_c = (noise_ratio * torch.sqrt(param_norm) / torch.sqrt(grad_c_norm) / np.sqrt(2)
                     / np.sqrt(np.sqrt(class_ratio[y_tmp] - 1)) / np.sqrt(np.sqrt(params_num)))
            noise = rho_c * 1.0 * (grad_c / grad_c_norm) * np.sqrt(params_num)
            noises[int(y_tmp)].append(noise.detach().clone())
            param.data = param.data + noise
        o_tmp = model.classifier(fea[idx])
        loss_list.extend(F.cross_entropy(o_tmp, y[idx], reduction="none"))
        for i in range(len(disturb_params)):
            disturb_params[i].data = origin_params[i].data.clone()
    return (1 - flat_ratio) * loss_ori.mean() + flat_ratio * torch.stack(loss_list).mean(), noises


def tiny_split_model():
    from fedlt.models.base import SplitModel

    torch.manual_seed(0)
    return SplitModel(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh()), torch.nn.Linear(3, 4), 3)


def test_cc_sam_perturbation_and_loss_match_the_official_step():
    from fedlt.sharpness import cc_sam_objective, cc_sam_perturbation
    from fedlt.train import cross_entropy_objective

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 5, generator=g), torch.tensor([0, 0, 1, 2, 2, 2, 3])
    counts = np.array([50, 20, 9, 3])
    ratio, noise_ratio = 0.3, 0.05  # a noise ratio large enough that the perturbation changes the loss

    official_model, ours_model = tiny_split_model(), tiny_split_model()
    official, noises = official_cc_sam_step(official_model, x, y, counts, ratio, noise_ratio)
    official.backward()
    # the perturbation of each class, by itself
    head = ours_model.classifier
    params = list(head.parameters())
    loss_ori = F.cross_entropy(head(ours_model.features(x)), y, reduction="none")
    for c in range(4):
        grads = torch.autograd.grad(loss_ori[y == c].mean(), params, retain_graph=True)
        for ours, theirs in zip(cc_sam_perturbation(list(grads), params, float(counts[c]), noise_ratio), noises[c]):
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-8)
    assert noises[0][0].norm() > 1e-3  # not a vanishing perturbation
    # the loss and the classifier's gradient (taken at θ + ε_c in both: ∂o/∂W does not depend on W)
    ours = cc_sam_objective(cross_entropy_objective, torch.tensor(counts), ratio, noise_ratio)(ours_model, x, y)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    plain = F.cross_entropy(ours_model(x), y)
    assert abs(ours.item() - plain.item()) > 1e-4  # the flat term is not the plain loss
    ours.backward()
    for a, b in zip(ours_model.classifier.parameters(), official_model.classifier.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_cc_sam_wraps_any_loss_objective_in_the_trainer():
    """With sam=cc_sam and a zero noise ratio the objective is (1−λ)L + λΣ_c (B_c/B) L_c: for a batch-mean loss
    that is L itself, so one SGD step equals the plain step; a positive noise ratio changes it."""
    from fedlt.losses import loss_objective
    from fedlt.train import OptimConfig, TensorData, train

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 2 + [3] * 2)
    data = TensorData(torch.randint(0, 256, (13, 5, 1, 1), generator=g, dtype=torch.uint8), labels,
                      torch.tensor([0.5]), torch.tensor([0.25]), 4)
    objective = loss_objective(LOSSES.get("eql")(data.class_counts, lam=0.3))

    def step(sam, noise):
        model = tiny_split_model()
        model.features[0] = torch.nn.Sequential(torch.nn.Flatten(), model.features[0])
        opt = OptimConfig(lr=0.5, batch_size=16, sam=sam, sam_noise_ratio=noise, momentum=0, weight_decay=0)
        train(model, data, objective, opt=opt, steps=1, generator=torch.Generator().manual_seed(0))
        return model.classifier.weight.detach()

    plain = step("none", 0.0)
    assert torch.allclose(step("cc_sam", 0.0), plain, atol=1e-6)
    assert not torch.allclose(step("cc_sam", 0.5), plain, atol=1e-4)


def test_cc_sam_centralized_option(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    summary = C.run_centralized(tiny_cfg("area", "centralized.sam=cc_sam", "centralized.area_fraction=0"),
                                RunDir(tmp_path))
    assert math.isfinite(summary["accuracy"])


def test_cc_sam_refuses_an_objective_that_transforms_the_batch(tmp_path, monkeypatch):
    from fedlt.errors import FedLTError

    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    with pytest.raises(FedLTError, match="sam=cc_sam needs an objective that calls model"):
        C.run_centralized(tiny_cfg("mixup", "centralized.sam=cc_sam"), RunDir(tmp_path))


def official_train_sample_step(classifier, fea, y, class_weights, epoch, stage, max_epoch, up_limit, adver_reg=1.0):
    """train_sample() of zzpustc/CC-SAM train_cifar.py for one batch, transcribed (sampler "Decoup", no
    DataParallel, ``fea`` the frozen backbone's output): the loss and each class's feature noise."""
    fea = fea.detach().clone()
    fea.requires_grad = True
    o = classifier(fea)
    loss_ori = F.cross_entropy(o, y, reduction="none")
    y_in = y.detach().cpu().numpy()
    loss_list, noises = [], {}
    alpha = (epoch - stage + 1) * 1.0 / (max_epoch - stage)
    alpha = alpha if alpha < up_limit else up_limit
    for y_tmp in np.unique(y_in):
        idx = np.where(y_in == y_tmp)
        loss_cls_spc = loss_ori[idx]
        if len(idx[0]) > 1:
            loss_cls_spc = loss_ori[idx].mean()
        fea_grad = torch.autograd.grad(loss_cls_spc, fea, retain_graph=True, allow_unused=True)[0]
        fea_grad = fea_grad / torch.norm(fea_grad)
        noise = adver_reg * fea_grad * class_weights[y_tmp]
        noises[int(y_tmp)] = noise
        o_tmp = classifier(fea + noise)
        loss_tmp = F.cross_entropy(o_tmp, y, reduction="none") * class_weights[y_tmp]
        loss_list.extend(loss_tmp[idx])
    loss_list = torch.stack(loss_list)
    return alpha * loss_list.mean() + (1 - alpha) * loss_ori.mean(), noises


def official_class_weights(labels, div):
    """pre_compute_class_ratio of zzpustc/CC-SAM utils/utils.py, transcribed: the class weights."""
    ratios = [int((labels == c).sum()) for c in range(len(np.unique(labels)))]
    return np.log(max(ratios) / np.array(ratios) + 0.01) / div


@pytest.mark.parametrize("head_kind", ["linear", "cosine"])
def test_cc_sam_stage2_noise_and_loss_match_the_official_train_sample(head_kind):
    from fedlt.centralized.ccsam import cc_sam_alpha, cc_sam_class_weights, cc_sam_feature_noise, cc_sam_stage2_loss
    from fedlt.models.base import make_classifier

    counts = np.array([50, 20, 9, 3])
    labels = np.repeat(np.arange(4), counts)
    weights = cc_sam_class_weights(torch.tensor(counts), div=2.0)
    official_w = official_class_weights(labels, 2.0)
    assert np.allclose(weights.numpy(), official_w, rtol=1e-6)
    assert weights[0] == pytest.approx(math.log(1.01) / 2) and weights[3] == pytest.approx(math.log(50 / 3 + .01) / 2)
    # α: official epoch 205 of stage 200 and max_epoch 230 is stage-2 epoch 5 of 30; CIFAR-100 caps it at 0.3
    assert cc_sam_alpha(5, 30, 1.0) == pytest.approx((205 - 200 + 1) / 30) and cc_sam_alpha(29, 30, 1.0) == 1.0
    assert cc_sam_alpha(20, 30, 0.3) == 0.3

    g = torch.Generator().manual_seed(3)
    fea = torch.randn(7, 3, generator=g) * 2
    y = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # classes 1 and 3 with one sample each (the official non-mean branch)
    torch.manual_seed(0)
    ours_head = make_classifier(3, 4, head_kind, scale=5.0)
    official_head = make_classifier(3, 4, head_kind, scale=5.0)
    official_head.load_state_dict(ours_head.state_dict())
    official, noises = official_train_sample_step(official_head, fea, y, torch.as_tensor(official_w).float(),
                                                  epoch=205, stage=200, max_epoch=230, up_limit=1.0, adver_reg=1.5)
    noise = cc_sam_feature_noise(ours_head, fea, y, weights, adver_reg=1.5)
    for c in range(4):
        rows = y == c
        assert torch.allclose(noise[rows], noises[c][rows], rtol=1e-5, atol=1e-7)
        assert (noises[c][~rows] == 0).all()  # the official noise of class c touches only class c's rows
        assert noise[rows].norm().item() == pytest.approx(1.5 * weights[c].item(), rel=1e-5)  # ‖n_c‖ = a·w_c
    ours = cc_sam_stage2_loss(ours_head, fea, y, weights, alpha=cc_sam_alpha(5, 30, 1.0), adver_reg=1.5)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    # not vacuous: the noisy term differs from the re-weighted clean one
    clean = 0.2 * (weights[y] * F.cross_entropy(ours_head(fea), y, reduction="none")).mean() + 0.8 * F.cross_entropy(
        ours_head(fea), y)
    assert abs(ours.item() - clean.item()) > 1e-3
    ours.backward()
    official.backward()
    for a, b in zip(ours_head.parameters(), official_head.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_cc_sam_stage2_noise_is_zero_where_the_feature_gradient_is():
    """The official G_c/‖G_c‖ is 0/0 (NaN) for a class whose feature gradient vanishes; fedlt gives it no noise."""
    from fedlt.centralized.ccsam import cc_sam_feature_noise

    head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.zero_()  # logits independent of the features: ∂ℓ/∂h = 0 for every sample
    noise = cc_sam_feature_noise(head, torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), torch.tensor([0.5, 2.0]))
    assert torch.equal(noise, torch.zeros(4, 3))


def test_cc_sam_method_runs_both_stages_and_resumes(tmp_path, monkeypatch):
    from fedlt.errors import FedLTError

    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("cc_sam", "centralized.stage2_epochs=2")
    assert (cfg.centralized.sam, cfg.centralized.stage2_lr, cfg.centralized.stage2_sampler) == (
        "cc_sam", 0.01, "class_balanced")
    with pytest.raises(FedLTError, match="method=cc_sam trains stage 1 with centralized.sam=cc_sam"):
        tiny_cfg("cc_sam", "centralized.sam=none")
    # stage 2's optimizer: a constant lr 0.01 (official adjust_learning_rate on CIFAR), no CC-SAM on the weights;
    # its augmentation: stage 1's (the official stage 2 reads the same transformed training set)
    method = CENTRALIZED.get("cc_sam")(cfg, np.array([40, 16, 8, 4]))
    opt2 = R.stage2_optim(cfg, method)
    assert [opt2.lr_at(e, 30) for e in (0, 15.5, 29.9)] == [0.01] * 3 and opt2.sam == "none"
    assert method.stage2_sampler().samples_per_class == 1  # train_cifar.py: ClassAwareSampler(train_dataset)
    data = tiny_experiment().tensor_data("train")
    strong = CENTRALIZED.get("cc_sam")(tiny_cfg("cc_sam", "centralized.autoaugment=true"), np.array([40, 16, 8, 4]))
    assert isinstance(strong.stage2_augment(data), StrongView)  # not the crop/flip of other methods' stage 2
    assert method.stage2_augment(data) == method.augment(data)
    states, orig = {}, RunDir.save_checkpoint

    def save(self, state):
        states[state["step"]] = {k: v.clone() for k, v in state["state"]["model"].items()}
        orig(self, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    full = C.run_centralized(cfg, RunDir(tmp_path / "full"))
    monkeypatch.setattr(RunDir, "save_checkpoint", orig)
    rows = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("stage") for r in rows] == [None, 1, 2, 2] and full["stage2_epochs"] == 2
    assert math.isfinite(full["accuracy"])
    # stage 2 trains the stage-1 classifier (kept, not re-initialised) and nothing of the backbone
    after1, after3 = states[1], states[3]
    head = [k for k in after3 if k.startswith("classifier.")]
    assert head and all(not torch.equal(after1[k], after3[k]) for k in head)
    backbone = [k for k in after3 if k.startswith("features.")]
    assert backbone and all(torch.equal(after1[k.replace("features.inner.", "features.")], after3[k])
                            for k in backbone)
    # killed after the first stage-2 epoch and resumed: the same final model, bit for bit
    resumed, steps = resumed_after_cut(C.run_centralized, cfg, RunDir(tmp_path / "cut"), 2, monkeypatch)
    assert steps == [1, 2] and resumed["accuracy"] == full["accuracy"]
    final = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["state"]["model"]
    assert all(torch.equal(final[k], after3[k]) for k in after3)


@pytest.mark.parametrize("path,data,flat_ratio,up_limit", [("cifar_lt_cc_sam.yaml", "cifar10", 0.3, 1.0),
                                                             ("cifar100_lt_cc_sam.yaml", "cifar100", 0.5, 0.3)])
def test_cc_sam_configs_run_both_official_stages(path, data, flat_ratio, up_limit):
    """configs/Cifar10.json, Cifar100.json: stage 200 of max_epoch 230; flat_ratio and up_limit per data set."""
    from fedlt.sweep import expand

    combos = expand(f"configs/centralized/{path}")
    assert sorted(cfg.data.imbalance_factor for cfg, _ in combos) == [10, 50, 100]
    for cfg, _ in combos:
        c = cfg.centralized
        assert (cfg.data.name, c.method, c.sam, c.sam_flat_ratio, c.sam_noise_ratio, c.up_limit) == (
            data, "cc_sam", "cc_sam", flat_ratio, 1e-6, up_limit)
        assert (c.epochs, c.stage2_epochs, c.stage2_lr, c.stage2_sampler, c.batch_size, c.weight_decay, c.div,
                c.adver_reg) == (200, 30, 0.01, "class_balanced", 64, 2e-4, 2.0, 1.0)
        # "lr_scheduler": warmup, lr_step [160, 180], warmup_epoch 5: WarmupMultiStepLR (warmup_factor 1/3) stepped
        # before each epoch (train_cifar.py), i.e. decay from 0-based epochs 159 and 179
        assert (c.warmup_epochs, c.warmup_factor, c.milestones, c.gamma) == (5, pytest.approx(1 / 3), [159, 179], 0.1)


# --------------------------------------------------------------------------- TDE
def test_tde_configs_differ_only_in_the_official_alpha():
    """classification/config/CIFAR10_LT/causal_norm_32.yaml α 1.0, CIFAR100_LT/causal_norm_32.yaml α 1.5; the
    rest of the two official files is the same recipe."""
    from fedlt.sweep import expand

    runs = {d: expand(f"configs/centralized/{f}") for d, f in (("cifar10", "cifar_lt_tde.yaml"),
                                                               ("cifar100", "cifar100_lt_tde.yaml"))}
    for data, alpha in (("cifar10", 1.0), ("cifar100", 1.5)):
        assert sorted(c.data.imbalance_factor for c, _ in runs[data]) == [10, 50, 100]
        for cfg, _ in runs[data]:
            c = cfg.centralized
            assert (cfg.data.name, c.method, c.alpha, c.lr, c.batch_size, c.weight_decay, c.milestones, c.gamma,
                    c.warmup_epochs, c.warmup_factor) == (data, "tde", alpha, 0.2, 256, 5e-4, [119, 159], 0.01, 5,
                                                          pytest.approx(1 / 3))


def official_causal_norm_forward(x, weight, embed, training, num_head=2, tau=16.0, alpha=1.0, gamma=0.03125):
    """Causal_Norm_Classifier.forward of classification/models/CausalNormClassifier.py, transcribed."""
    head_dim = weight.shape[1] // num_head
    scale = tau / num_head

    def multi_head_call(func, t, w=None):
        return torch.cat([func(item, w) if w else func(item) for item in torch.split(t, head_dim, dim=1)], dim=1)

    def l2_norm(t):
        return t / torch.norm(t, 2, 1, keepdim=True)

    def causal_norm(t, w):
        return t / (torch.norm(t, 2, 1, keepdim=True) + w)

    normed_w = multi_head_call(causal_norm, weight, w=gamma)
    normed_x = multi_head_call(l2_norm, x)
    y = torch.mm(normed_x * scale, normed_w.t())
    if not training:
        normed_c = multi_head_call(l2_norm, embed.view(1, -1))
        output = []
        for nx, nc, nw in zip(torch.split(normed_x, head_dim, 1), torch.split(normed_c, head_dim, 1),
                              torch.split(normed_w, head_dim, 1)):
            cos_val = (nx * nc).sum(-1, keepdim=True) / torch.norm(nx, 2, 1, keepdim=True) / torch.norm(nc, 2, 1,
                                                                                                         keepdim=True)
            output.append(torch.mm((nx - cos_val * alpha * nc) * scale, nw.t()))
        y = sum(output)
    return y


def test_tde_head_matches_the_official_classifier_and_moving_average():
    from fedlt.centralized.tde import CausalNormClassifier

    g = torch.Generator().manual_seed(0)
    head = CausalNormClassifier(6, 4, num_head=2, tau=16.0, alpha=1.5, gamma=0.03125, mu=0.9)
    x1, x2, xt = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g)
    # training: plain causal-norm logits, and ē ← 0.9·ē + mean(x) per batch (run_networks.py, CIFAR: μ fixed)
    assert torch.allclose(head(x1), official_causal_norm_forward(x1, head.weight, None, True, alpha=1.5), atol=1e-5)
    head(x2)
    embed = 0.9 * (0.9 * torch.zeros(6) + x1.mean(0)) + x2.mean(0)
    assert torch.allclose(head.embed, embed, atol=1e-6)
    # test: the counterfactual logits
    head.eval()
    expected = official_causal_norm_forward(xt, head.weight.detach(), embed, False, alpha=1.5)
    assert torch.allclose(head(xt), expected, atol=1e-5)
    assert not torch.allclose(expected, official_causal_norm_forward(xt, head.weight.detach(), embed, True), atol=1e-3)
    assert torch.equal(head.embed, embed)  # evaluation does not move the average
    fresh = CausalNormClassifier(6, 4)
    fresh.eval()
    assert torch.isfinite(fresh(xt)).all()  # no training batch yet: no removal (the official ē would be 0/0)


def test_tde_smoke_and_resume_keeps_the_moving_average(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    summary = C.run_centralized(tiny_cfg("tde"), RunDir(tmp_path))
    assert math.isfinite(summary["accuracy"])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state"]["model"]
    assert state["classifier.embed"].abs().sum() > 0


def test_tde_refuses_cc_sam_at_config_time():
    from fedlt.errors import FedLTError

    with pytest.raises(FedLTError, match="tde cannot run with centralized.sam=cc_sam"):
        tiny_cfg("tde", "centralized.sam=cc_sam")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_div_sum_is_torchs_kl_div_in_value_and_gradient(dtype):
    """NCL's and SHIKE's KLs are written out (vmap has no batching rule for aten::kl_div); the same numbers as
    F.kl_div(reduction='sum'), bit for bit, a zero target entry included (0·log 0 = 0), and the same gradients
    in both arguments."""
    from fedlt.losses.base import kl_div_sum

    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(6, 5, generator=g, dtype=dtype), torch.randn(6, 5, generator=g, dtype=dtype)
    ours, torchs = kl_div_sum, (lambda a, b: F.kl_div(a, b, reduction="sum"))
    with_zero = torch.softmax(t, 1) * (torch.arange(5) != 2)
    assert torch.equal(ours(torch.log_softmax(z, 1), with_zero), torchs(torch.log_softmax(z, 1), with_zero))
    grads = []
    for kl in (torchs, ours):
        zz, tt = z.clone().requires_grad_(), t.clone().requires_grad_()
        value = kl(torch.log_softmax(zz, 1), torch.softmax(tt, 1))
        value.backward()
        grads.append((value.detach(), zz.grad, tt.grad))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.equal(grads[0][0], grads[1][0]) and grads[0][0] > 0
    assert torch.allclose(grads[0][1], grads[1][1], rtol=0, atol=tol)
    assert torch.allclose(grads[0][2], grads[1][2], rtol=0, atol=tol)
