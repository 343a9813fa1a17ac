"""LFME (xiangly55/LFME): each formula against a transcription of the official arithmetic on hand-made inputs,
and the centralized method's two stages (experts on their groups, then the student) through run_centralized."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_centralized_methods import tiny_cfg, tiny_experiment

import fedlt.centralized as C
import fedlt.centralized.run as R
from conftest import resumed_after_cut
from fedlt.centralized.lfme import LFMEModel, RecordedOrder, group_data, lfme_groups
from fedlt.errors import FedLTError
from fedlt.losses.lfme import (
    curriculum_weights,
    group_thresholds,
    lfme_loss,
    scheduled_instance_weight,
    self_paced_weight,
)
from fedlt.rundir import RunDir
from fedlt.train import TensorData


# --- transcriptions of the official arithmetic (run_network_LFME.py, dataloader_LFME.py, DistillationLoss.py) ---
def official_batch_loss(logits, labels, logits_distill, shot_list, scheduler_weight, weights, T):
    logits = logits * scheduler_weight.unsqueeze(-1)
    loss_perf = torch.nn.CrossEntropyLoss()(logits, labels)
    total = 0.0
    for phase in shot_list:
        # DistillationLoss.forward: F.kl_div(F.log_softmax(y / T), F.softmax(teacher / T)) * scale (size_average)
        kd = F.kl_div(F.log_softmax(logits[:, shot_list[phase]] / T, dim=1),
                      F.softmax(logits_distill[phase] / T, dim=1), reduction="mean") * len(shot_list[phase])
        total += kd * weights[phase]
    return loss_perf + total * 1.0


def official_distill_weight(current, distill, decay_thresh):
    if current < distill * decay_thresh:
        return 1.0
    gap = distill - current
    weight = (gap / distill) / (1 - decay_thresh)
    return max(weight, 0.0)


def official_scale(instance_weights, labels, shot_list, thresh=1.0, low=12, medium=53, many=230):
    scaled_instance_weight = np.zeros(np.shape(instance_weights))
    labels = np.array(labels)
    for i in range(len(np.unique(labels))):
        class_idxs = np.where(labels == i)[0]
        scaled = instance_weights[class_idxs]
        if i in shot_list["low_shot"]:
            thresh_tmp = thresh
        elif i in shot_list["median_shot"]:
            thresh_tmp = thresh * low / medium
        elif i in shot_list["many_shot"]:
            thresh_tmp = thresh * low / many
        scaled = (scaled - scaled.min()) / (scaled.max() - scaled.min()) * (1 - thresh_tmp) + thresh_tmp
        scaled_instance_weight[class_idxs] = scaled
    return scaled_instance_weight


def official_linear(init_weight, e, total_epochs):
    E = total_epochs / 2
    return (1 - init_weight) / E * e + init_weight


# --- formulas ---
def test_loss_by_hand():
    # 3 classes, experts over {0, 1} and {2}; student z = 0, expert 0 = (ln 3, 0): p = (3/4, 1/4), q = (1/2, 1/2);
    # CE = ln 3; KD_0 = 3/4·ln(3/2) + 1/4·ln(1/2) (B = 1, T = 1); the one-class expert's KD is 0
    z, y = torch.zeros(1, 3), torch.tensor([2])
    experts = [torch.tensor([[math.log(3), 0.0]]), torch.tensor([[5.0]])]
    groups = [torch.tensor([0, 1]), torch.tensor([2])]
    kd = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert lfme_loss(z, experts, groups, y, None, [1.0, 0.5], 1.0).item() == pytest.approx(math.log(3) + kd, abs=1e-6)
    assert lfme_loss(z, experts, groups, y, None, [0.5, 0.5], 1.0).item() == pytest.approx(math.log(3) + kd / 2,
                                                                                           abs=1e-6)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")  # the official kl_div is the elementwise mean
def test_loss_matches_the_official_batch_loss():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(5, 6, generator=g) * 3, torch.tensor([0, 5, 2, 3, 1])
    shot_list = {"many_shot": [0, 1], "median_shot": [2, 3, 4], "low_shot": [5]}
    experts = {k: torch.randn(5, len(v), generator=g) * 2 for k, v in shot_list.items()}
    v = torch.tensor([0.2, 1.0, 0.7, 1.3, 0.5])
    weights = {"many_shot": 0.0, "median_shot": 0.4, "low_shot": 1.0}
    want = official_batch_loss(z, y, experts, shot_list, v, weights, 2.0)
    got = lfme_loss(z, list(experts.values()), [torch.tensor(c) for c in shot_list.values()], y, v,
                    list(weights.values()), 2.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # the experts' logits are teachers: no gradient reaches them
    t = [e.clone().requires_grad_() for e in experts.values()]
    lfme_loss(z.requires_grad_(), t, [torch.tensor(c) for c in shot_list.values()], y, v, [1.0, 1.0, 1.0]).backward()
    assert all(e.grad is None for e in t)


@pytest.mark.parametrize("student,expert", [(0.1, 0.8), (0.24, 0.8), (0.5, 0.8), (0.79, 0.8), (0.9, 0.8),
                                            (0.0, 0.5)])
def test_self_paced_weight_matches_the_official(student, expert):
    assert self_paced_weight(student, expert, 0.3) == pytest.approx(official_distill_weight(student, expert, 0.3))


def test_self_paced_weight_by_hand_and_zero_expert():
    assert self_paced_weight(0.1, 0.8) == 1.0  # 0.1 < 0.3·0.8
    assert self_paced_weight(0.5, 0.8) == pytest.approx(0.3 / 0.8 / 0.7)
    assert self_paced_weight(0.9, 0.8) == 0.0
    assert self_paced_weight(0.0, 0.0) == 0.0  # the official divides by zero here


def test_curriculum_weights_match_the_official_scaling():
    # mean counts 230, 53, 12 (many, medium, few): the official hard-coded ImageNet-LT thresholds
    counts = np.array([230, 53, 12])
    group_of = np.array([0, 1, 2])
    theta = group_thresholds(counts, group_of)
    assert theta.tolist() == pytest.approx([12 / 230, 12 / 53, 1.0])
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 1])
    p = np.array([0.9, 0.2, 0.5, 0.3, 0.8, 0.1, 0.6, 0.55])
    want = official_scale(p, labels, {"many_shot": [0], "median_shot": [1], "low_shot": [2]})
    assert curriculum_weights(p, labels, theta) == pytest.approx(want)
    # by hand, class 0: (p − 0.2)/0.7·(1 − 12/230) + 12/230
    assert curriculum_weights(p, labels, theta)[2] == pytest.approx(0.3 / 0.7 * (1 - 12 / 230) + 12 / 230)
    # one confidence per class (max = min): 1, where the official gives NaN
    assert curriculum_weights(np.array([0.4]), np.array([0]), theta).tolist() == [1.0]


def test_instance_weight_schedule_matches_the_official_linear():
    w = torch.tensor([0.2, 1.0, 0.5])
    for e in (0, 1, 5, 10):
        assert scheduled_instance_weight(w, e, 10).tolist() == pytest.approx(official_linear(w, e, 10).tolist())
    assert scheduled_instance_weight(w, 5, 10).tolist() == pytest.approx([1.0, 1.0, 1.0])  # E = half the epochs
    assert scheduled_instance_weight(w, 10, 10).tolist() == pytest.approx([1.8, 1.0, 1.5])  # not clamped


# --- the method ---
def test_groups_and_group_data():
    assert lfme_groups(np.array([40, 16, 8, 4])) == [[0, 1], [2], [3]]  # 4 classes: class-index thirds ⌊3c/4⌋
    assert lfme_groups(np.array([500, 300, 50, 30, 10])) == [[0, 1], [2, 3], [4]]  # count rule
    data = TensorData(torch.arange(6).view(6, 1, 1, 1).to(torch.uint8), torch.tensor([3, 0, 2, 3, 1, 2]),
                      torch.tensor([0.0]), torch.tensor([1.0]), 4)
    sub, idx = group_data(data, [3, 2])
    assert idx.tolist() == [0, 2, 3, 5] and sub.labels.tolist() == [0, 1, 0, 1] and sub.num_classes == 2


def test_recorded_order_names_each_batch_and_refuses_a_mismatch():
    labels = torch.tensor([0, 1, 0, 1, 1])
    order = RecordedOrder(lambda lab, g, e: torch.tensor([4, 0, 2, 1, 3]), batch_size=2)
    order(labels, torch.Generator(), 0)
    assert order.next_batch(torch.tensor([1, 0])).tolist() == [4, 0]
    with pytest.raises(FedLTError, match="does not match"):
        order.next_batch(torch.tensor([1, 1]))


def test_stage1_trains_only_the_experts_and_stage2_only_the_student(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("lfme", "centralized.epochs=1", "centralized.stage2_epochs=1")
    exp = tiny_experiment()
    steps = R.CentralizedSteps(cfg, exp, torch.device("cpu"))
    model = steps.model
    assert isinstance(model, LFMEModel) and [e.classifier.out_features for e in model.experts] == [2, 1, 1]

    def snapshot():
        return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    before = snapshot()
    steps.step(1)  # stage 1: the experts
    after = snapshot()
    changed = {k.split(".")[0] + (("." + k.split(".")[1]) if k.startswith("experts") else "")
               for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"experts.0", "experts.1", "experts.2"}
    steps.step(2)  # stage 2: the student from the frozen experts
    final = snapshot()
    moved = {k.split(".")[0] for k in after if not torch.equal(after[k], final[k])}
    assert moved == {"student"}
    assert steps.method.last["student_accuracy"] == [0.0, 0.0, 0.0]  # before the first student epoch
    assert len(steps.method.expert_accuracy) == 3


def test_two_stage_run_resumes_in_the_student_stage(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("lfme", "centralized.epochs=1", "centralized.stage2_epochs=2")
    full = C.run_centralized(cfg, RunDir(tmp_path / "full"))
    assert math.isfinite(full["accuracy"]) and full["stage2_epochs"] == 2
    resumed, _ = resumed_after_cut(C.run_centralized, cfg, RunDir(tmp_path / "cut"), 2, monkeypatch)
    assert resumed["accuracy"] == full["accuracy"] and resumed["loss"] == pytest.approx(full["loss"])


def test_sharpness_aware_and_pretraining_are_refused():
    with pytest.raises(FedLTError, match="centralized.sam=none"):
        tiny_cfg("lfme", "centralized.sam=cc_sam")
    with pytest.raises(FedLTError, match="centralized.pretrain=none"):
        tiny_cfg("lfme", "centralized.pretrain=rotation", "centralized.pretrain_epochs=1")
