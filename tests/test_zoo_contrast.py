"""Issue 14 part B: GLMC, SSP and SBCL against a transcription of their official code's arithmetic.

Each ``official_*`` function transcribes (does not import or copy) the named official file; fedlt's formula
must give the same numbers on the same hand-made input.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_centralized_methods import tiny_cfg, tiny_experiment
from torch import nn

import fedlt.centralized as C
import fedlt.centralized.run as R
from conftest import ROOT, resumed_after_cut
from fedlt.config import load_config
from fedlt.losses.glmc import cumulative_alpha, glmc_label_weights, glmc_loss, glmc_mixed, rand_bbox
from fedlt.registry import CENTRALIZED
from fedlt.rundir import RunDir

CIFAR10_LT_100 = np.array([int(5000 * 0.01 ** (c / 9)) for c in range(10)])


def smoke(method, tmp_path, monkeypatch, *extra):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    summary = C.run_centralized(tiny_cfg(method, *extra), RunDir(tmp_path))
    for key in ("accuracy", "loss", "ece"):
        assert math.isfinite(summary[key]), key
    return summary


# ----------------------------------------------------------------------------------------------------- GLMC


def official_update_weight(cls_num_list, label_weighting):
    """ynu-yangpeng/GLMC Trainer.update_weight."""
    w = 1.0 / (np.array(cls_num_list) ** label_weighting)
    return torch.FloatTensor(w / np.sum(w) * len(cls_num_list))


def official_rand_bbox(size, lam, cx, cy):
    """utils/util.py rand_bbox with the centre (np.random.randint(W), np.random.randint(H)) given."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1. - lam)
    cut_w, cut_h = np.ceil(W * cut_rat).astype(int), np.ceil(H * cut_rat).astype(int)
    return (np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H),
            np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H))


def official_glmc_step(model_heads, org1, org2, invs1, invs2, target_org, target_invs, weights, lam, box,
                       alpha, contrast_weight, num_classes):
    """Trainer.train's step body with util.GLMC_mixed (λ and the box given)."""
    one_hot_org = torch.zeros(target_org.size(0), num_classes).scatter_(1, target_org.view(-1, 1), 1)
    one_hot_org_w = weights * one_hot_org
    one_hot_invs = torch.zeros(target_invs.size(0), num_classes).scatter_(1, target_invs.view(-1, 1), 1)
    one_hot_invs_w = weights * one_hot_invs
    mixup_x = lam * org1 + (1 - lam) * invs1
    mixup_y = lam * one_hot_org + (1 - lam) * one_hot_invs
    mixup_y_w = lam * one_hot_org_w + (1 - lam) * one_hot_invs_w
    bbx1, bby1, bbx2, bby2 = box
    org2 = org2.clone()
    org2[:, :, bbx1:bbx2, bby1:bby2] = invs2[:, :, bbx1:bbx2, bby1:bby2]
    mixcut_y = lam * one_hot_org + (1 - lam) * one_hot_invs
    cutmix_y_w = lam * one_hot_org_w + (1 - lam) * one_hot_invs_w
    output_1, output_cb_1, z1, p1 = model_heads(mixup_x)
    output_2, output_cb_2, z2, p2 = model_heads(org2)

    def simsiam(p, z):
        return -F.cosine_similarity(p, z.detach(), dim=-1).mean()

    contrastive_loss = simsiam(p1, z2) + simsiam(p2, z1)
    loss_mix = -torch.mean(torch.sum(F.log_softmax(output_1, dim=1) * mixup_y, dim=1))
    loss_cut = -torch.mean(torch.sum(F.log_softmax(output_2, dim=1) * mixcut_y, dim=1))
    loss_mix_w = -torch.mean(torch.sum(F.log_softmax(output_cb_1, dim=1) * mixup_y_w, dim=1))
    loss_cut_w = -torch.mean(torch.sum(F.log_softmax(output_cb_2, dim=1) * cutmix_y_w, dim=1))
    return alpha * (loss_mix + loss_cut) + (1 - alpha) * (loss_mix_w + loss_cut_w) + contrast_weight * contrastive_loss


def test_glmc_label_weights_and_cumulative_alpha():
    for k in (1.0, 1.2):
        assert torch.allclose(glmc_label_weights(CIFAR10_LT_100, k), official_update_weight(CIFAR10_LT_100, k))
    # alpha = 1 - (epoch / epochs) ** 2 with the 0-based epoch of Trainer.train
    assert [cumulative_alpha(e, 200) for e in (0, 100, 199)] == [1.0, 0.75, 1 - (199 / 200) ** 2]


@pytest.mark.parametrize("lam,cx,cy", [(0.3, 1, 6), (0.8, 7, 0), (0.05, 4, 4)])
def test_glmc_box_is_the_official_rand_bbox(lam, cx, cy):
    class Fixed:  # stands in for np.random: the two centre draws, in the official order (W first)
        def __init__(self):
            self.draws = [cx, cy]

        def integers(self, high):
            return self.draws.pop(0)
    size = (5, 3, 8, 10)
    assert rand_bbox(size, lam, Fixed()) == tuple(int(v) for v in official_rand_bbox(size, lam, cx, cy))


def test_glmc_step_loss_equals_the_official_step():
    g = torch.Generator().manual_seed(0)
    b, c, d = 6, 10, 16
    x = [torch.randn(b, 3, 8, 8, generator=g) for _ in range(4)]
    y_org, y_invs = torch.randint(0, c, (b,), generator=g), torch.randint(0, c, (b,), generator=g)
    feat, fc, fc_cb = nn_linear(3 * 64, d, g), nn_linear(d, c, g), nn_linear(d, c, g)
    proj, pred = nn_linear(d, 8, g), nn_linear(8, 8, g)

    def heads(inp):
        h = torch.relu(feat(inp.flatten(1)))
        z = proj(h)
        return fc(h), fc_cb(h), z, pred(z)

    w = glmc_label_weights(CIFAR10_LT_100, 1.2)
    lam, box, alpha = 0.37, (2, 1, 7, 5), cumulative_alpha(60, 200)
    mix_x, cut_x, t, tw = glmc_mixed(*x, y_org, y_invs, w, lam, box)
    ours = glmc_loss(heads(mix_x), heads(cut_x), t, tw, alpha, 4.0)
    official = official_glmc_step(heads, *x, y_org, y_invs, w, lam, box, alpha, 4.0, c)
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    assert not torch.equal(cut_x, x[1]) and torch.equal(cut_x[:, :, 7:], x[1][:, :, 7:])  # only the box pasted
    # the gradients agree too (the stop-gradient on z of the consistency term included)
    go = torch.autograd.grad(ours, list(fc_cb.parameters()) + list(pred.parameters()) + list(proj.parameters()))
    gf = torch.autograd.grad(official, list(fc_cb.parameters()) + list(pred.parameters()) + list(proj.parameters()))
    assert all(torch.allclose(a, b_, atol=1e-6) for a, b_ in zip(go, gf))


def nn_linear(i, o, g):
    layer = torch.nn.Linear(i, o)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(o, i, generator=g) / math.sqrt(i))
        layer.bias.copy_(torch.randn(o, generator=g) * 0.1)
    return layer


def test_glmc_model_heads_and_official_protocol():
    cfg = load_config("configs/centralized/cifar_lt_glmc.yaml")
    o = cfg.centralized
    assert (o.method, o.epochs, o.lr, o.batch_size, o.weight_decay, o.label_weighting, o.contrast_weight,
            o.resample_weighting, o.mix_alpha) == ("glmc", 200, 0.01, 64, 5e-3, 1.2, 1.0, 0.0, 1.0)
    m = CENTRALIZED.get("glmc")(cfg, CIFAR10_LT_100)

    class Exp:
        num_classes, in_channels = 10, 3
    model = m.build_model(Exp())
    assert model.feature_dim == 256 and model.projection_head.out_features == 128  # ResNet_modify(nf=64)
    out, cb, z, p = model.heads(torch.randn(2, 3, 32, 32))
    assert out.shape == cb.shape == (2, 10) and z.shape == p.shape == (2, 128)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model.heads(x)[1])  # test time: the re-balanced head fc_cb


def test_glmc_runs_and_resamples_by_n_to_the_minus_q(tmp_path, monkeypatch):
    smoke("glmc", tmp_path, monkeypatch)
    m = CENTRALIZED.get("glmc")(tiny_cfg("glmc", "centralized.resample_weighting=1"), np.array([40, 16, 8, 4]))
    assert torch.allclose(m.resample, torch.full((4,), 0.25, dtype=torch.float64))  # q = 1: class-balanced
    m = CENTRALIZED.get("glmc")(tiny_cfg("glmc"), np.array([40, 16, 8, 4]))
    assert torch.allclose(m.resample, torch.tensor([40, 16, 8, 4], dtype=torch.float64) / 68)  # q = 0


# ------------------------------------------------------------------------------------------------------ SSP


def official_rotation(inputs, permutation):
    """YyzHarry/imbalanced-semi-self utils.py rotation (np.random.permutation given)."""
    batch = inputs.shape[0]
    target = torch.Tensor(permutation([0, 1, 2, 3] * (int(batch / 4) + 1)))[:batch].long()
    image = torch.zeros_like(inputs)
    image.copy_(inputs)
    for i in range(batch):
        image[i, :, :, :] = torch.rot90(inputs[i, :, :, :], target[i], [1, 2])
    return image, target


@pytest.mark.parametrize("batch", [1, 7, 8, 13])
def test_rotation_batch_is_the_official_rotation(batch):
    from fedlt.centralized.pretrain import rotation_batch
    x = torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(batch))
    ours = rotation_batch(x, np.random.default_rng(3))
    official = official_rotation(x, np.random.default_rng(3).permutation)
    assert torch.equal(ours[0], official[0]) and torch.equal(ours[1], official[1])
    if batch >= 4:  # a balanced mix of the four rotations, each image one of its own rotations
        assert set(ours[1].tolist()) == {0, 1, 2, 3}
    assert torch.equal(torch.rot90(ours[0][0], -int(ours[1][0]), [1, 2]), x[0])


def test_rotation_head_is_kaiming_normal_as_the_official_resnet():
    """YyzHarry/imbalanced-semi-self ``resnet32(num_classes=4)`` applies ``_weights_init`` (models/resnet_cifar.py):
    ``kaiming_normal_`` on every Linear's weight, std √(2/64) = 0.177 (PyTorch's default gives about 0.07)."""
    from fedlt.centralized.pretrain import rotation_model
    from fedlt.models.base import SplitModel

    backbone = SplitModel(nn.Sequential(nn.Flatten(), nn.Linear(8, 4096)), nn.Linear(4096, 3), 4096)
    head = rotation_model(backbone, seed=5).classifier
    assert head.weight.std().item() == pytest.approx((2 / 4096) ** 0.5, rel=0.05)
    assert head.bias.abs().max().item() <= 1 / 4096 ** 0.5  # the bias keeps nn.Linear's U(±1/√d)


def test_pretrain_needs_epochs_and_a_single_feature_extractor(tmp_path, monkeypatch):
    from fedlt.errors import FedLTError
    with pytest.raises(FedLTError, match="centralized.pretrain_epochs"):
        tiny_cfg("ce", "centralized.pretrain=rotation")
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    with pytest.raises(FedLTError, match="one feature extractor"):
        C.run_centralized(tiny_cfg("balpoe", "centralized.pretrain=rotation", "centralized.pretrain_epochs=1"),
                          RunDir(tmp_path))


@pytest.mark.parametrize("method", ["ce", "glmc"])
def test_ssp_stage0_trains_features_only_then_the_method_runs(method, tmp_path, monkeypatch):
    import json
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg(method, "centralized.pretrain=rotation", "centralized.pretrain_epochs=2")
    steps = R.CentralizedSteps(cfg, tiny_experiment(), torch.device("cpu"))
    head0 = {k: v.clone() for k, v in steps.model.classifier.state_dict().items()}
    feat0 = {k: v.clone() for k, v in steps.model.features.state_dict().items()}
    assert steps.total == 3 and steps.stage == 0
    steps.step(1)
    assert all(torch.equal(v, head0[k]) for k, v in steps.model.classifier.state_dict().items())
    assert any(not torch.equal(v, feat0[k]) for k, v in steps.model.features.state_dict().items())
    summary = C.run_centralized(cfg, RunDir(tmp_path))
    assert math.isfinite(summary["accuracy"]) and summary["pretrain_epochs"] == 2
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("stage") for r in rows] == [None, 0, 0, 1]


def test_ssp_resumes_across_the_stage_switch(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("ce", "centralized.pretrain=rotation", "centralized.pretrain_epochs=2", "centralized.epochs=2")
    full = C.run_centralized(cfg, RunDir(tmp_path / "full"))
    for cut in (1, 2):
        resumed, _ = resumed_after_cut(C.run_centralized, cfg, RunDir(tmp_path / f"cut{cut}"), cut, monkeypatch)
        assert resumed["accuracy"] == full["accuracy"] and resumed["loss"] == pytest.approx(full["loss"])


# ----------------------------------------------------------------------------------------------------- SBCL


def official_supcon_rank(features, labels, cluster_target, ranking_temperature, temperature=0.1,
                         base_temperature=0.07, grama=0.25):
    """JackHck/SBCL SimCLR/loss.py SupConLoss_rank.forward (features [bsz, 2, d]; .cuda() dropped)."""
    batch_size = features.shape[0]
    cluster_target = cluster_target.contiguous().view(-1, 1)
    mask = torch.eq(cluster_target, cluster_target.T).float()
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature, anchor_count = contrast_feature, contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    one_hot_labels = F.one_hot(labels, num_classes=len(ranking_temperature)).repeat(anchor_count, 1).float()
    rt = torch.from_numpy(ranking_temperature).float()
    rt = torch.matmul(one_hot_labels, rt.T).unsqueeze(0).T
    anchor_rank_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), rt)
    logits_rank_max, _ = torch.max(anchor_rank_contrast, dim=1, keepdim=True)
    logits_rank = anchor_rank_contrast - logits_rank_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    labels = labels.contiguous().view(-1, 1)
    label_mask = torch.eq(labels, labels.T).float().repeat(anchor_count, contrast_count)
    logits_label_mask = (~mask.bool()).float() * logits_mask
    lst = np.arange(batch_size, batch_size * anchor_count).tolist()
    lst.extend(np.arange(batch_size).tolist())
    ad_mask = torch.scatter(torch.zeros(mask.size(0), mask.size(1)), 0, torch.tensor([lst]), 1)
    exp_logits_rank = torch.exp(logits_rank) * (ad_mask + logits_label_mask)
    label_mask = ad_mask + logits_label_mask * label_mask
    log_prob_rank = logits_rank - torch.log(exp_logits_rank.sum(1, keepdim=True))
    mean_log_label_pos = (label_mask * log_prob_rank).sum(1) / label_mask.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos - grama * mean_log_label_pos
    return loss.mean()


def official_supcon(features, labels, temperature=0.1, base_temperature=0.1):
    """SimCLR/loss.py SupConLoss.forward, contrast_mode 'all'."""
    batch_size = features.shape[0]
    mask = torch.eq(labels.view(-1, 1), labels.view(-1, 1).T).float()
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    adc = torch.div(torch.matmul(contrast_feature, contrast_feature.T), temperature)
    logits = adc - adc.max(dim=1, keepdim=True)[0].detach()
    mask = mask.repeat(2, 2)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * 2).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    return (-(temperature / base_temperature) * (mask * log_prob).sum(1) / mask.sum(1)).view(2, batch_size).mean()


def official_density(features_by_class, cluster_number, temperature):
    """SimCLR/main.py cluster(), train_rule 'Rank': the ranking temperatures."""
    feature_center = [torch.mean(t, dim=0) for t in features_by_class]
    density = np.zeros(len(cluster_number))
    for i in range(len(cluster_number)):
        center_distance = F.pairwise_distance(features_by_class[i], feature_center[i], p=2).mean() / np.log(
            len(features_by_class[i]) + 10)
        density[i] = center_distance.numpy()
    density = density.clip(np.percentile(density, 20), np.percentile(density, 80))
    density = temperature * (density / density.mean())
    for index, value in enumerate(cluster_number):
        if value == 1:
            density[index] = temperature
    return density


def test_sbcl_loss_equals_the_official_supcon_rank():
    from fedlt.losses.sbcl import sbcl_loss, supcon_loss
    g = torch.Generator().manual_seed(1)
    b = 10
    f = F.normalize(torch.randn(2 * b, 8, generator=g), dim=1)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 0])
    sub = torch.tensor([0, 1, 0, 1, 2, 3, 2, 4, 4, 1])  # classes 0 and 1 split in two, class 2 whole
    tau = np.array([0.08, 0.13, 0.1])
    official = official_supcon_rank(torch.stack([f[:b], f[b:]], 1), labels, sub, tau)
    assert sbcl_loss(f, labels, sub, torch.tensor(tau)).item() == pytest.approx(official.item(), rel=1e-5)
    assert supcon_loss(f, labels).item() == pytest.approx(
        official_supcon(torch.stack([f[:b], f[b:]], 1), labels).item(), rel=1e-5)


def test_sbcl_subclass_numbers_density_and_kmeans():
    from fedlt.losses.sbcl import class_temperatures, cosine_kmeans, subclass_numbers
    counts = CIFAR10_LT_100.tolist()
    official = [t // max(min(counts), 10) for t in counts]
    assert subclass_numbers(counts) == [v if v else 1 for v in official] == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert subclass_numbers([3, 2, 1]) == [1, 1, 1]  # max(min n, 10) = 10
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0] * 30 + [1] * 12 + [2] * 6 + [3] * 4 + [4] * 3)
    f = F.normalize(torch.randn(len(labels), 6, generator=g) + labels[:, None] * 0.3, dim=1)
    numbers = [3, 2, 1, 1, 1]
    ours = class_temperatures(f, labels, numbers, 0.1)
    want = official_density([f[labels == c] for c in range(5)], numbers, 0.1)
    assert torch.allclose(ours, torch.tensor(want, dtype=torch.float32), rtol=1e-5)
    # k-means: two well-separated cosine groups are found whatever the start
    x = torch.cat([torch.tensor([[1.0, 0.05 * i] for i in range(5)]), torch.tensor([[0.05 * i, 1.0] for i in range(4)])])
    ids = cosine_kmeans(x, 2, np.random.default_rng(0))
    assert len(set(ids[:5].tolist())) == 1 and len(set(ids[5:].tolist())) == 1 and ids[0] != ids[5]


def test_sbcl_clusters_after_the_warmup_and_runs_both_stages(tmp_path, monkeypatch):
    summary = smoke("sbcl", tmp_path, monkeypatch, "centralized.epochs=2", "centralized.supcon_epochs=1",
                    "centralized.cluster_step=1", "centralized.stage2_epochs=1", "centralized.cluster=4")
    assert summary["stage2_epochs"] == 1
    cfg = tiny_cfg("sbcl", "centralized.supcon_epochs=1", "centralized.cluster=4")
    m = CENTRALIZED.get("sbcl")(cfg, np.array([40, 16, 8, 4]))
    assert m.numbers == [10, 4, 2, 1]
    assert not m.clustering_due(0) and m.clustering_due(1)  # first epoch after the warm-up, then every step
    m.subclasses = torch.zeros(1)
    assert not m.clustering_due(1) and m.clustering_due(10) and not m.clustering_due(11)
    exp = tiny_experiment()
    model = m.build_model(exp)
    m.augment(exp.tensor_data("train"))
    m.cluster(model)
    labels = m.data.labels
    assert m.subclasses.max().item() + 1 == sum(m.numbers)
    for c, k in enumerate(m.numbers):  # each class's subclasses are its own block of ids
        ids = set(m.subclasses[labels == c].tolist())
        offset = sum(m.numbers[:c])
        assert ids <= set(range(offset, offset + k)) and len(ids) >= 1
    assert m.class_tau[3] == pytest.approx(0.1)  # one subclass: τ = T


def official_linear_classify_lr(epoch: int, lr: float) -> float:
    """JackHck/SBCL SimCLR/linear_classify.py adjust_learning_rate, the ``--train_rule DRW`` branch (``epoch``
    from 0); its ``epoch > 190`` branch after ``epoch > 180`` is never taken, as there."""
    epoch = epoch + 1
    if epoch <= 5:
        return lr * epoch / 5
    if epoch > 180:
        return lr * 0.01
    if epoch > 140:
        return lr * 0.1
    return lr


def test_sbcl_stage2_optimizer_of_the_shipped_config_is_linear_classify():
    cfg = load_config(ROOT / "configs/centralized/cifar_lt_sbcl.yaml")
    opt2 = R.stage2_optim(cfg, CENTRALIZED.get("sbcl")(cfg, CIFAR10_LT_100))
    assert (opt2.batch_size, opt2.weight_decay, opt2.momentum, opt2.nesterov) == (128, 0.0, 0.9, False)
    for epoch in range(200):
        for frac in (0.0, 0.5, 0.99):  # held for the whole epoch, as adjust_learning_rate once per epoch
            assert opt2.lr_at(epoch + frac, 200) == pytest.approx(official_linear_classify_lr(epoch, 0.1)), epoch


def official_moco_rank(logits, im_label, queue_label, im_cluster, queue_cluster, temperature=0.07,
                       ranking_temperature=0.12, grama=0.2):
    """JackHck/SBCL moco/loss.py SupConLoss_rank.forward (.cuda() dropped)."""
    im_label = im_label.contiguous().view(-1, 1)
    label_mask = torch.eq(im_label, queue_label).float()
    im_cluster = im_cluster.contiguous().view(-1, 1)
    cluster_mask = torch.eq(im_cluster, queue_cluster).float()
    cluster_mask_com = torch.cat([torch.ones([cluster_mask.shape[0], 1]), cluster_mask], dim=1)
    log_cluster_prob = F.normalize((logits / temperature).exp(), dim=1, p=1).log()
    loss_cluster = -torch.sum((cluster_mask_com * log_cluster_prob).sum(1) / cluster_mask_com.sum(1)) / \
        cluster_mask_com.shape[0]
    inverse_cluster = (~cluster_mask.bool()).float()
    label_mask = torch.cat([torch.ones([label_mask.shape[0], 1]), inverse_cluster * label_mask], dim=1)
    inverse_cluster = torch.cat([torch.ones([inverse_cluster.shape[0], 1]), inverse_cluster], dim=1)
    logits_label = logits / ranking_temperature
    log_label_prob = logits_label - torch.log((torch.exp(logits_label) * inverse_cluster).sum(1, keepdim=True))
    loss_label = -torch.sum((label_mask * log_label_prob).sum(1) / label_mask.sum(1)) / label_mask.shape[0]
    return loss_cluster + grama * loss_label


def test_sbcl_queue_losses_equal_the_official_moco_losses():
    from fedlt.losses.sbcl import kcl_loss, sbcl_queue_loss
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 1 + 8, generator=g) * 0.5
    labels, sub = torch.tensor([0, 0, 1, 2, 1]), torch.tensor([0, 1, 2, 3, 2])
    q_labels = torch.tensor([[0, 0, 1, 1, -1, 2, 0, 1]])
    q_sub = torch.tensor([[0, 1, 2, 2, -1, 3, 1, 2]])
    ours = sbcl_queue_loss(logits, labels, q_labels[0], sub, q_sub[0])
    assert ours.item() == pytest.approx(official_moco_rank(logits, labels, q_labels, sub, q_sub).item(), rel=1e-5)
    # KCL with one same-class entry per anchor: every draw picks it, so the loss is deterministic
    q_one = torch.tensor([0, 1, 2, -1, -1, -1, -1, 3])
    log_prob = F.log_softmax(logits / 0.07, 1)
    want = -torch.stack([(log_prob[i, 0] + log_prob[i, 1 + int((q_one == labels[i]).nonzero())]) / 2
                         for i in range(5)]).mean()
    assert kcl_loss(logits, labels, q_one, 6, torch.Generator().manual_seed(0)).item() == pytest.approx(want.item())


def test_sbcl_queue_form_runs_and_fills_the_queue(tmp_path, monkeypatch):
    smoke("sbcl", tmp_path, monkeypatch, "centralized.epochs=2", "centralized.supcon_epochs=1",
          "centralized.cluster_step=1", "centralized.stage2_epochs=1", "centralized.cluster=4",
          "centralized.queue_size=32")
    cfg = tiny_cfg("sbcl", "centralized.queue_size=32", "centralized.supcon_epochs=0", "centralized.cluster=4")
    m = CENTRALIZED.get("sbcl")(cfg, np.array([40, 16, 8, 4]))
    exp = tiny_experiment()
    model = m.build_model(exp)
    data = exp.tensor_data("train")
    m.augment(data)
    m.sampler()(data.labels, torch.Generator().manual_seed(0), 0)
    idx = m.recorder.order[:16]
    x, y = m.views(((data.images[idx].float() - 127) / 64), torch.Generator().manual_seed(1)), data.labels[idx]
    before = [p.clone() for p in m.key_model.parameters()] if m.key_model else None
    assert before is None
    loss = m.objective(0)(model, x, y)
    assert math.isfinite(loss.item()) and m.subclasses is not None  # clustered at epoch 0 (no warm-up)
    assert int(m.queue["ptr"]) == 16 and torch.equal(m.queue["labels"][:16], y)
    assert torch.equal(m.queue["subclasses"][:16], m.subclasses[idx]) and (m.queue["labels"][16:] == -1).all()


@pytest.mark.parametrize("queue", [0, 32])
def test_sbcl_resumes_with_its_subclasses_and_queue(queue, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("sbcl", "centralized.epochs=2", "centralized.supcon_epochs=0", "centralized.cluster_step=2",
                   "centralized.stage2_epochs=1", "centralized.cluster=4", f"centralized.queue_size={queue}")
    full = C.run_centralized(cfg, RunDir(tmp_path / "full"))
    # cut after epoch 1: epoch 2 trains on the subclasses of epoch 1's clustering (step 2)
    resumed, _ = resumed_after_cut(C.run_centralized, cfg, RunDir(tmp_path / "cut"), 1, monkeypatch)
    assert resumed["accuracy"] == full["accuracy"] and resumed["loss"] == pytest.approx(full["loss"])
