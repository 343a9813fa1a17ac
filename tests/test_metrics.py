import numpy as np
import pytest
import torch

from fedlt.metrics import class_groups, evaluate_logits, expected_calibration_error


def test_count_rule_groups():
    groups, rule = class_groups(np.array([500, 101, 100, 20, 19, 1]))
    assert groups.tolist() == [0, 0, 1, 1, 2, 2]
    assert rule.startswith("count")


def test_thirds_when_count_rule_leaves_a_group_empty():
    groups, rule = class_groups(np.array([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]))
    assert groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rule.startswith("class-index thirds")


def test_thirds_follow_training_size_where_classes_are_not_in_size_order():
    # a long-tailed file list (data.profile=none) whose head class is class 9: the many group is the largest
    # classes, not classes 0-3; ties keep class order
    counts = np.array([50, 83, 139, 232, 387, 645, 1077, 1796, 2997, 5000])
    groups, rule = class_groups(counts)
    assert groups.tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0, 0]
    assert rule.startswith("thirds by training count")
    groups, _ = class_groups(np.array([500, 40, 500, 40, 500, 40]))  # step profile, interleaved
    assert groups.tolist() == [0, 1, 0, 2, 1, 2]  # ranks 0, 3, 1, 4, 2, 5


def test_accuracy_balanced_and_groups_on_hand_made_predictions():
    # 3 classes; test labels unbalanced on purpose so that top-1 != balanced accuracy
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 0, 0])  # class 0: 3/4, class 1: 1/2, class 2: 0/2
    logits = torch.full((8, 3), -5.0)
    logits[torch.arange(8), torch.as_tensor(pred)] = 5.0
    m = evaluate_logits(logits, labels, train_counts=np.array([500, 50, 5]))
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert m["per_class"] == pytest.approx([0.75, 0.5, 0.0])
    assert (m["many"], m["medium"], m["few"]) == pytest.approx((0.75, 0.5, 0.0))


def test_ece_hand_computed():
    # confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.3 (wrong) in 15 bins of width 1/15
    probs = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.3, 0.3, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bins: {0.9, 0.9}: acc 0.5, conf 0.9; {0.6}: acc 1, conf 0.6; {0.4}: acc 0 (pred 2), conf 0.4
    expected = 0.5 * abs(0.5 - 0.9) + 0.25 * abs(1 - 0.6) + 0.25 * abs(0 - 0.4)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)


def test_reliability_bins_put_full_confidence_in_the_last_bin():
    from fedlt.metrics import reliability_bins

    bins = reliability_bins(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([0, 1]))
    assert bins["count"][14] == 1 and bins["accuracy"][14] == 1.0
    assert bins["count"][7] == 1  # 0.5 lies in (7/15, 8/15]
    assert sum(bins["count"]) == 2


def test_nan_or_inf_outputs_are_refused_and_a_minus_inf_mask_is_not():
    from fedlt.errors import FedLTError

    logits, labels, counts = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), np.array([50, 10, 5])
    masked = logits.clone()
    masked[:, 2] = float("-inf")  # a class masked out: its probability is 0, the others are finite
    assert evaluate_logits(masked, labels, counts)["per_class"][2] == 0.0
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[1, 0] = bad
        with pytest.raises(FedLTError, match=r"^the model's outputs are NaN or infinite on 1 of 4 test images"):
            evaluate_logits(broken, labels, counts)


# --------------------------------------------------------------- against transcriptions of the official metrics


def official_shot_acc(preds, labels, train_labels, many_shot_thr=100, low_shot_thr=20):
    """facebookresearch/classifier-balancing utils.py ``shot_acc`` (KaihuaTang's is the same): per test class its
    recall; many > 100, few < 20 training samples, medium the rest; each group the mean of its classes' recalls."""
    train_labels = np.asarray(train_labels)
    many, medium, few = [], [], []
    for c in np.unique(labels):
        recall = (preds[labels == c] == c).sum() / (labels == c).sum()
        n = (train_labels == c).sum()
        (many if n > many_shot_thr else few if n < low_shot_thr else medium).append(recall)
    return [np.mean(g) if g else 0.0 for g in (many, medium, few)]


def official_calibration(true_labels, pred_labels, confidences, num_bins=15):
    """dvlab-research/MiSLAS utils/metric.py ``calibration`` (eval.py calls it with 15 bins): np.digitize(...,
    right=True) into (lo, hi] bins; ECE = Σ_b |acc_b − conf_b|·n_b / Σ_b n_b."""
    bins = np.linspace(0.0, 1.0, num_bins + 1)
    indices = np.digitize(confidences, bins, right=True)
    gaps, counts = np.zeros(num_bins), np.zeros(num_bins)
    for b in range(num_bins):
        s = np.where(indices == b + 1)[0]
        if len(s):
            gaps[b] = abs(np.mean(true_labels[s] == pred_labels[s]) - np.mean(confidences[s]))
            counts[b] = len(s)
    return np.sum(gaps * counts) / np.sum(counts)


@pytest.mark.parametrize("seed", range(6))
def test_groups_and_ece_equal_shot_acc_and_mislas_calibration(seed):
    """Where the count rule fills all three groups: fedlt's many/medium/few are ``shot_acc``'s, on balanced and
    unbalanced test sets (a class absent from the test set is left out by both); ECE is MiSLAS's (float32
    confidences, as fedlt computes them), including confidences on a bin edge."""
    rng = np.random.default_rng(seed)
    c = 37
    counts = rng.choice([5, 19, 20, 21, 99, 100, 101, 150, 600], c)
    counts[:3] = [150, 50, 5]  # every group non-empty
    labels = np.repeat(np.arange(c), 8) if seed % 2 else rng.integers(0, c, 300)
    logits = torch.as_tensor(rng.normal(size=(len(labels), c)) * [0.5, 3, 10][seed % 3], dtype=torch.float32)
    out = evaluate_logits(logits, labels, counts)
    assert out["group_rule"].startswith("count")
    probs = torch.softmax(logits, 1).numpy()
    preds = probs.argmax(1)
    official = official_shot_acc(preds, labels, np.repeat(np.arange(c), counts))
    assert [out["many"], out["medium"], out["few"]] == pytest.approx(official, abs=1e-12)
    assert out["ece"] == pytest.approx(official_calibration(labels, preds, probs.max(1)), abs=1e-12)
    edge = np.array([[0.6, 0.4], [0.4, 0.6], [1.0, 0.0], [0.8, 0.2]], dtype=np.float64)  # 0.6, 1.0, 0.8: bin edges
    y = np.array([0, 0, 0, 1])
    assert expected_calibration_error(edge, y) == pytest.approx(
        official_calibration(y, edge.argmax(1), edge.max(1)), abs=1e-15)
