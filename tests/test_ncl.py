"""NCL (Bazinga699/NCL) against a transcription of its official arithmetic: ``lib/loss/loss.py`` (``NBOD``,
``NIL_NBOD``), ``lib/core/combiner.py`` (``multi_network_default_CON``), ``lib/net/MOCO.py`` (the queue) and
``lib/core/function.py`` (the momentum update). The ``official_*`` functions transcribe (do not import or copy)
the official code; fedlt must give the same numbers on hand-made inputs."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlt.config import load_config
from fedlt.data.augment import simclr_augment
from fedlt.losses.ncl import hard_category_mask, log_counts, moco_loss, nbod, nil_nbod_loss
from fedlt.models.experts import resnet32_experts, small_cnn_experts
from fedlt.registry import CENTRALIZED
from fedlt.sweep import expand

ROOT = Path(__file__).resolve().parents[1]


# --- transcriptions of the official code ---
def official_nbod(inputs, factor):
    n = len(inputs)
    if n == 1:
        return 0
    soft = [F.softmax(inputs[i], dim=1) for i in range(n)]
    logsoft = [torch.log(soft[i] + 1e-9) for i in range(n)]
    loss = 0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            loss += factor * F.kl_div(logsoft[i], soft[j], reduction="batchmean")
    return loss / (n - 1)


def official_nil_nbod(inputs, targets, num_class_list, hcm_n, factor, factor_hcm, ce_ratio, hcm_ratio):
    weight = torch.FloatTensor(num_class_list)
    select = inputs[0].scatter(1, targets.unsqueeze(1), 999999)
    top = select.sort(descending=True, dim=1)[1][:, :hcm_n]
    mask = torch.zeros_like(inputs[0]).scatter(1, top, 1)
    balance, hcm, ce, loss_hcm = [], [], 0, 0
    for i in range(len(inputs)):
        logits = inputs[i] + weight.unsqueeze(0).expand(inputs[i].shape[0], -1).log()
        balance.append(logits)
        hcm.append(logits * mask)
        ce += F.cross_entropy(logits, targets)
        loss_hcm += F.cross_entropy(hcm[i], targets)
    loss = official_nbod(balance, factor) + official_nbod(hcm, factor_hcm)
    return loss + ce * ce_ratio + loss_hcm * hcm_ratio


def official_moco(q, k, queue_dk, temperature):
    """One expert of ``multi_network_default_CON`` + ``MoCo._dequeue_and_enqueue`` (queue is (dim, K))."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue_dk.clone().detach()])
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    new_queue = queue_dk.clone()
    new_queue[:, 0:k.shape[0]] = k.T  # ptr 0
    return loss, new_queue


# --- formulas ---
def test_hard_category_mask_keeps_the_label_and_its_most_confused_classes():
    z = torch.tensor([[5.0, 1.0, 3.0, 0.0, 2.0], [0.0, 9.0, 8.0, 7.0, 1.0]])
    y = torch.tensor([3, 1])
    # row 0: the label 3 (lowest logit) is forced in, then the top logit (class 0); row 1: label 1, then 2
    assert hard_category_mask(z, y, 2).tolist() == [[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert hard_category_mask(z, y, 3).sum(1).tolist() == [3, 3]
    assert hard_category_mask(z, y, 30).tolist() == [[1] * 5] * 2  # k ≥ C: every category (official slicing)


def test_nbod_against_the_official_nbod_and_by_hand():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 6, generator=g) * 3 for _ in range(3)]
    assert nbod(z, 0.6).item() == pytest.approx(official_nbod(z, 0.6).item(), rel=1e-6)
    assert nbod(z[:1], 0.6).item() == 0.0 and nbod([z[0], z[0].clone()], 0.6).item() == pytest.approx(0, abs=1e-6)
    # two experts, one sample: p = (0.5, 0.5), q = softmax(0, log 3) = (0.25, 0.75); λ·(KL(q‖p) + KL(p‖q))
    a, b = torch.zeros(1, 2), torch.tensor([[0.0, math.log(3.0)]])
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert nbod([a, b], 0.6).item() == pytest.approx(0.6 * (kl_qp + kl_pq), rel=1e-5)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_nil_nbod_against_the_official_nil_nbod(k):
    g = torch.Generator().manual_seed(1)
    counts = [500, 120, 40, 9, 3, 1]
    z = torch.randn(3, 8, 6, generator=g) * 2
    y = torch.tensor([0, 5, 2, 3, 1, 4, 5, 0])
    want = official_nil_nbod(list(z), y, counts, k, 0.6, 0.4, 1.0, 0.5)
    got = nil_nbod_loss(z, y, log_counts(torch.tensor(counts)), k, 0.6, 0.4, 1.0, 0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # gradients too (neither side of NBOD is detached; the mask carries no gradient)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    official_nil_nbod(list(za), y, counts, k, 0.6, 0.4, 1.0, 0.5).backward()
    nil_nbod_loss(zb, y, log_counts(torch.tensor(counts)), k, 0.6, 0.4, 1.0, 0.5).backward()
    assert torch.allclose(za.grad, zb.grad, atol=1e-6)


def test_the_hard_view_zeroes_the_other_logits_and_shifts_by_log_counts():
    # one expert, C = 3, k = 2, label 0: hard = {0, 1}; s = z + log n, partial logits (s0, s1, 0)
    z, y, counts = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([0]), torch.tensor([4.0, 2.0, 1.0])
    s = z[0] + counts.log()
    full = -F.log_softmax(s, 0)[0]
    part = -F.log_softmax(torch.stack([s[0], s[1], torch.tensor(0.0)]), 0)[0]
    assert nil_nbod_loss(z[None], y, log_counts(counts), 2).item() == pytest.approx((full + part).item(), rel=1e-6)
    assert log_counts(torch.tensor([3, 0])).tolist() == pytest.approx([math.log(3), 0.0])  # an empty class counts as 1


def test_moco_loss_against_the_official_contrastive_logits():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    queue_dk = F.normalize(torch.randn(5, 8, generator=g), dim=0)
    want, _ = official_moco(q, k, queue_dk, 0.2)
    assert moco_loss(q, k, queue_dk.T, 0.2).item() == pytest.approx(want.item(), rel=1e-6)


# --- the model hook and the method ---
def test_experts_without_a_shared_stem_are_whole_networks():
    shared, whole = resnet32_experts(10, widths=(16, 32, 64)), resnet32_experts(10, widths=(16, 32, 64),
                                                                                shared_stem=False)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert n(whole.stem) == 0 and n(whole.experts[0]) == n(shared.stem) + n(shared.experts[0])
    assert whole(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    small = small_cnn_experts(4, shared_stem=False)
    assert n(small.stem) == 0 and small(torch.zeros(2, 1, 12, 12)).shape == (2, 4)


def tiny_ncl(*overrides):
    from test_centralized_methods import tiny_cfg, tiny_experiment

    exp = tiny_experiment()
    cfg = tiny_cfg("ncl", "centralized.queue_size=16", *overrides)
    method = CENTRALIZED.get("ncl")(cfg, np.bincount(exp.train.labels))
    return method, method.build_model(exp)


def test_ncl_objective_against_the_official_combiner_and_momentum_update():
    torch.manual_seed(0)
    method, model = tiny_ncl()
    assert method.opts.hard_k(method.num_classes) == 1 and method.opts.num_experts == 3 and method.key_model is not None
    assert sum(p.numel() for p in model.stem.parameters()) == 0  # whole networks per expert (official)
    x, y = torch.randn(12, 1, 12, 12), torch.tensor([0, 1, 2, 3, 0, 1])  # [query view; key view]
    key_before = copy.deepcopy(method.key_model)
    objective = method.objective(0)
    loss = objective(model, x, y)  # creates the queue, then writes 6 keys into it
    # recompute with the official arithmetic: the same queue as the method drew (its first state)
    method2, _ = tiny_ncl()
    method2.key_model = copy.deepcopy(key_before)
    method2.momentum_keys(model, x[6:])
    queue_before = method2.queues.clone()
    feats = [e.features(model.stem(x[:6])) for e in model.experts]
    logits = [e.classifier(h) for e, h in zip(model.experts, feats)]
    want = official_nil_nbod(logits, y, [40, 16, 8, 4], 1, 0.6, 0.6, 1.0, 1.0)
    new_queues = []
    for m, h in enumerate(feats):
        key_feat = key_before.experts[m].features(key_before.stem(x[6:]))
        k = key_before.projections[m](key_feat)
        con, new_queue = official_moco(model.projections[m](h), k, queue_before[m].T, 0.2)
        want = want + con
        new_queues.append(new_queue.T)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(method.queues, torch.stack(new_queues), atol=1e-6) and method.pointer == 6
    # function.py: inside ``for net_id in range(network_num)``, ema.mul_(α).add_(1 − α, θ_q) over EVERY
    # expert's backbone parameters, i.e. M = 3 updates per step; the key MLPs and classifiers never change
    want_keys = copy.deepcopy(key_before)
    for _ in range(3):
        for e_k, e_q in zip(want_keys.experts, model.experts):
            for pk, pq in zip(e_k.features.parameters(), e_q.features.parameters()):
                pk.data.mul_(0.999).add_(pq.data, alpha=1 - 0.999)
    for e_k, e_old, e_want in zip(method.key_model.experts, key_before.experts, want_keys.experts):
        for pk, pw in zip(e_k.features.parameters(), e_want.features.parameters()):
            assert torch.allclose(pk, pw, atol=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(e_k.classifier.parameters(), e_old.classifier.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(method.key_model.projections.parameters(),
                                                 key_before.projections.parameters()))
    loss.backward()
    assert all(p.grad is not None for p in model.projections.parameters())
    assert not any(p.requires_grad for p in method.key_model.parameters())


def test_ncl_without_the_contrastive_part_is_nil_nbod_on_one_view():
    method, model = tiny_ncl("centralized.contrastive=false")
    assert method.key_model is None and not hasattr(model, "projections")
    x, y = torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    want = official_nil_nbod(list(model.expert_logits(x)), y, [40, 16, 8, 4], 1, 0.6, 0.6, 1.0, 1.0)
    assert method.objective(0)(model, x, y).item() == pytest.approx(want.item(), rel=1e-5)


def test_ncl_trains_and_resumes_bit_identically(tmp_path, monkeypatch):
    from test_centralized_methods import tiny_cfg, tiny_experiment

    import fedlt.centralized as C
    import fedlt.centralized.run as R
    from conftest import resumed_after_cut
    from fedlt.rundir import RunDir

    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("ncl", "centralized.epochs=2", "centralized.queue_size=16")
    full = C.run_centralized(cfg, RunDir(tmp_path / "full"))
    assert math.isfinite(full["loss"]) and math.isfinite(full["accuracy"])
    resumed, _ = resumed_after_cut(C.run_centralized, cfg, RunDir(tmp_path / "cut"), 1, monkeypatch)
    assert resumed["per_class"] == full["per_class"] and resumed["loss"] == full["loss"]


def test_ncl_config_is_the_official_cifar_protocol():
    runs = expand(ROOT / "configs/centralized/cifar_lt_ncl.yaml")
    assert sorted((c.data.name, c.data.imbalance_factor) for c, _ in runs) == sorted(
        (d, b) for d in ("cifar10", "cifar100") for b in (100, 50, 10))
    c = runs[0][0].centralized
    # LR_STEP [320, 360], WARM_EPOCH 5 of 1-based epochs, WarmupMultiStepLR (warmup_factor 1/3) stepped before each
    # (lib/utils/lr_scheduler.py, main/multi_network_train_final.py): decay from 0-based epochs 319 and 359
    assert (c.method, c.epochs, c.lr, c.batch_size, c.weight_decay, c.nesterov, c.warmup_epochs, c.milestones) == (
        "ncl", 400, 0.1, 64, 2e-4, True, 5, [319, 359])
    assert c.warmup_factor == pytest.approx(1 / 3)
    assert (c.num_experts, c.classifier, c.shared_stem, c.reduce_dimension, c.autoaugment, c.cutout) == (
        3, "linear", False, False, True, 16)
    assert (c.distill_weight, c.distill_weight_hard, c.ce_ratio, c.hard_ratio, c.hard_categories) == (
        0.6, 0.6, 1.0, 1.0, None)
    assert (c.contrastive, c.key_view, c.contrastive_weight, c.moco_dim, c.queue_size, c.moco_temperature,
            c.key_momentum) == (True, "simclr", 1.0, 64, 1024, 0.2, 0.999)
    # 30 hard categories of CIFAR-100's 100 (HCM_N: 30), in proportion 3 of CIFAR-10's 10
    cfg = load_config(None, ["mode=centralized", "centralized.method=ncl", "model.name=resnet32"])
    assert CENTRALIZED.get("ncl")(cfg, np.ones(100, dtype=int)).opts.hard_k(100) == 30
    assert CENTRALIZED.get("ncl")(cfg, np.ones(10, dtype=int)).opts.hard_k(10) == 3


def test_ncl_resnet32_heads_keep_the_default_linear_initialisation():
    from test_centralized_methods import tiny_experiment

    cfg = load_config(None, ["mode=centralized", "centralized.method=ncl", "model.name=resnet32"])
    exp = tiny_experiment()
    model = CENTRALIZED.get("ncl")(cfg, np.bincount(exp.train.labels)).build_model(exp)
    w = model.experts[0].classifier.weight
    # nn.Linear's default: U(−1/√64, 1/√64); the backbone's Kaiming normal would have std √(2/64) ≈ 0.18
    assert w.shape == (4, 64) and w.abs().max() <= 1 / 8 and model.experts[0].classifier.bias is not None


def test_the_key_view_is_the_simclr_view_drawn_from_the_generator():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    a = simclr_augment(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, simclr_augment(x, torch.Generator().manual_seed(5)))
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x, atol=0.05)
    # chunk = 2: one draw per pair, so two identical images in a pair get the identical view
    pair = torch.cat([x[:1], x[:1]])
    b = simclr_augment(pair, torch.Generator().manual_seed(5), chunk=2)
    assert torch.equal(b[0], b[1])
    method, _ = tiny_ncl()
    from fedlt.train import TensorData
    data = TensorData(torch.zeros(4, 1, 12, 12, dtype=torch.uint8), torch.zeros(4, dtype=torch.long),
                      torch.tensor([0.5]), torch.tensor([0.25]), 4)
    views = method.augment(data)
    z = torch.randn(4, 1, 12, 12)
    out = views(z, torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 12, 12) and views.key == "simclr"


# --- the federated client (NIL + NBOD only) ---
def test_ncl_client_objective_is_nil_nbod_on_the_local_counts():
    from clients.ncl import NCLClient
    from fedlt.train import TensorData

    cfg = load_config(None, ["client.name=ncl", "model.name=small_cnn_experts", "model.num_experts=2"])
    model = small_cnn_experts(4, num_experts=2)
    labels = torch.tensor([0, 0, 0, 1, 3, 3])  # local counts (3, 1, 0, 2): class 2 absent, counted as 1
    data = TensorData(torch.zeros(6, 1, 12, 12, dtype=torch.uint8), labels, torch.tensor([0.5]),
                      torch.tensor([0.25]), 4)
    x, y = torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    got = NCLClient(cfg).objective(model, data, {})(model, x, y)
    want = official_nil_nbod(list(model.expert_logits(x)), y, [3, 1, 1, 2], 1, 0.6, 0.6, 1.0, 1.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_ncl_refuses_a_model_without_experts_and_cc_sam():
    from fedlt.errors import FedLTError

    with pytest.raises(FedLTError, match="centralized.method=ncl needs a multi-expert model"):
        load_config(None, ["mode=centralized", "centralized.method=ncl", "model.name=resnet20"])
    with pytest.raises(FedLTError, match="set centralized.sam=none"):
        load_config(None, ["mode=centralized", "centralized.method=ncl", "centralized.sam=cc_sam"])
    with pytest.raises(FedLTError, match="client method ncl needs a multi-expert model"):
        load_config(None, ["client.name=ncl", "model.name=small_cnn"])


def test_ncl_client_one_federated_round(tmp_path):
    from test_federated_methods import CIFAR_JPEG, simulate, tiny_config, write_tiny_lists

    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    cfg = tiny_config(write_tiny_lists(tmp_path / "tiny"), "client.name=ncl", "model.name=small_cnn_experts",
                      "federation.rounds=1")
    summary, rows = simulate(cfg, tmp_path / "run")
    assert summary["client"] == "ncl" and len(rows) >= 1
    assert math.isfinite(summary["accuracy"]) and math.isfinite(summary["loss"])
