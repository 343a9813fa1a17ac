"""Fed-GraB (Xiao et al., NeurIPS 2023) against a transcription of the official arithmetic of
ZackZikaiXiao/FedGraB (util/losses.py PIDLOSS / PID / random_unit, util/wene.py WENO) on hand-made inputs,
and one tiny federated run through the in-process engine."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clients.fedgrab import (
    MAX_OUT,
    FedGraBClient,
    SGBState,
    accumulate,
    pid_step,
    random_release,
    sgb_loss_and_grad,
    sgb_map,
    sgb_weights,
)
from fedlt.config import load_config
from strategies.fedgrab import FedGraB, shot_split
from strategies.global_prior import DPA_ASSUMED_TOTAL, DirectPriorAnalyzer, dpa_proportions

sys.path.insert(0, str(Path(__file__).resolve().parent))


# --------------------------------------------------------------------------- transcriptions of the release
class OfficialPID:
    """util/losses.py PID in mode PID_DELTA (Kp 10, Ki 0.01, Kd 0.1); its LimitMax clamps nothing."""

    def __init__(self) -> None:
        self.kp, self.ki, self.kd = 10, 0.01, 0.1
        self.out, self.error, self.dbuf, self.open = 0.0, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], False

    def calc(self, current: float, set_value: float = 0.0) -> float:
        if not self.open:
            return 0.0
        self.error[2] = self.error[1]
        self.error[1] = self.error[0]
        self.error[0] = set_value - current
        p = self.kp * (self.error[0] - self.error[1])
        i = self.ki * self.error[0]
        self.dbuf[2] = self.dbuf[1]
        self.dbuf[1] = self.dbuf[0]
        self.dbuf[0] = self.error[0] - 2.0 * self.error[1] + self.error[2]
        self.out += p + i + self.kd * self.dbuf[0]
        return self.out


def official_map(x: float) -> float:
    return (10 / 9) / ((1 / 9) + math.exp(-0.5 * x))


def official_release(tail: list[int], num_classes: int, uniform) -> list[int]:
    """PIDLOSS.hook_func_tensor's draw: prob_dist[j] = 0.1**(j/(T-1)); random_unit(p): p==0 False, p==1 True,
    else random() < p; tail_id advances only on a release."""
    prob = [0.1 ** (j / (len(tail) - 1.0)) for j in range(len(tail))]
    out, tail_id = [], 0
    for c in range(num_classes):
        if c in tail:
            p = prob[tail_id]
            hit = False if p == 0 else True if p == 1 else uniform() < p
            if hit:
                out.append(c)
                tail_id += 1
    return out


def official_weno(norms: np.ndarray) -> np.ndarray:
    """WENO.weno_estimation's proportions from the rows' norms: (x - mean)/std (numpy's), shift by the minimum
    when it is negative, divide by the sum."""
    x = (norms - norms.mean()) / norms.std()
    x = x.tolist()
    m = min(x)
    if m < 0:
        x = [v - m for v in x]
    s = sum(x)
    return np.array([v / s for v in x])


def official_shot_split(dist: list[float], thresholds=(75, 95)) -> dict[str, list[int]]:
    """WENO.shot_split (util/wene.py): bubble sort descending, cumulative percentages, cut at the thresholds."""
    num, cls = list(dist), list(range(len(dist)))
    for i in range(len(num)):
        for j in range(len(num) - i - 1):
            if num[j] < num[j + 1]:
                num[j], num[j + 1] = num[j + 1], num[j]
                cls[j], cls[j + 1] = cls[j + 1], cls[j]
    acc = (np.cumsum(np.array(num)) / sum(num) * 100).tolist()
    aux = [0] + acc
    ranges = [[aux[i - 1], aux[i]] for i in range(1, len(aux))]
    cut1 = cut2 = 0
    for i, (lo, hi) in enumerate(ranges):
        if thresholds[0] > lo and thresholds[0] <= hi:
            cut1 = i
        if thresholds[1] > lo and thresholds[1] <= hi:
            cut2 = i
    out = {"head": [], "middle": [], "tail": []}
    for i, c in enumerate(cls):
        out["head" if i <= cut1 else "middle" if i <= cut2 else "tail"].append(c)
    return out


# --------------------------------------------------------------------------- the balancer, formula by formula
def test_map_function_matches_the_release():
    for x in (-30.0, -2.5, 0.0, 0.7, 4.0, 30.0):
        assert float(sgb_map(torch.tensor(x, dtype=torch.float64))) == pytest.approx(official_map(x), rel=1e-12)
    assert float(sgb_map(torch.tensor(0.0))) == pytest.approx(1.0)  # an idle controller leaves BCE as it is


def test_pid_step_matches_the_release_delta_controller():
    """Three classes (the third closed) over eight steps of hand-made imbalances P_c − Q_c."""
    diffs = [[0.5, -0.2, 3.0], [0.3, -0.4, 1.0], [0.1, 0.2, 2.0], [-0.2, 0.1, 0.0], [0.0, -0.3, 5.0],
             [0.4, 0.4, 1.0], [-0.1, 0.0, 2.0], [0.25, -0.05, 0.5]]
    official = [OfficialPID() for _ in range(3)]
    official[0].open = official[1].open = True
    state = SGBState.zeros(3)
    open_mask = torch.tensor([True, True, False])
    for d in diffs:
        state.pos = torch.tensor(d, dtype=torch.float64)  # P − Q = d with Q = 0
        state.neg = torch.zeros(3, dtype=torch.float64)
        u = pid_step(state, open_mask)
        np.testing.assert_allclose(u.numpy(), [official[c].calc(d[c]) for c in range(3)], rtol=1e-12, atol=1e-15)
    assert state.err[2].abs().sum() == 0 and state.out[2] == 0  # a closed controller keeps its (reset) state


def test_pid_output_is_clamped_at_100_unlike_the_release():
    """The release's LimitMax assigns to its argument, so |u| grows without bound; fedlt clamps at 100."""
    official, state = OfficialPID(), SGBState.zeros(1)
    official.open = True
    us, refs = [], []
    for _ in range(3):
        state.pos = torch.tensor([-50.0], dtype=torch.float64)  # e = 50 every step
        us.append(float(pid_step(state, torch.tensor([True]))[0]))
        refs.append(official.calc(-50.0))
    # step 1: Δ = 10·50 + 0.01·50 + 0.1·50 = 505.5; step 2: 0.5 − 5 = −4.5; step 3: 0.5
    assert refs == pytest.approx([505.5, 501.0, 501.5])
    assert us == pytest.approx([MAX_OUT, 95.5, 96.0])


def test_weighted_bce_gradient_matches_the_release_hook():
    """The release: BCE-with-logits summed over classes / N, and a hook multiplying d/dz by W; fedlt weights the
    loss with W held fixed. Same gradient; the accumulators P, Q from |g| as the hook's."""
    torch.manual_seed(0)
    z = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 2, 3, 1])
    u = torch.tensor([1.5, -0.5, 0.0, 3.0], dtype=torch.float64)
    target = F.one_hot(y, 4).double()
    released = torch.tensor([False, False, True, False])
    w = sgb_weights(u, target, released)
    # the release
    pos_w = torch.tensor([official_map(float(v)) for v in u], dtype=torch.float64)
    neg_w = torch.tensor([official_map(-float(v)) for v in u], dtype=torch.float64)
    weight = pos_w * target + neg_w * (1 - target)
    weight[:, 2] = 1  # the released class
    np.testing.assert_allclose(w.numpy(), weight.numpy(), rtol=1e-12)
    z_ref = z.clone().requires_grad_(True)
    z_ref.register_hook(lambda g: g * weight)
    (F.binary_cross_entropy_with_logits(z_ref, target, reduction="none").sum() / 5).backward()
    g_ref = z_ref.grad.abs().clone()
    g_ref[:, 2] = 0
    pos_ref, neg_ref = (g_ref * target).sum(0), (g_ref * (1 - target)).sum(0)
    # fedlt
    z_new = z.clone().requires_grad_(True)
    loss, grad = sgb_loss_and_grad(z_new, y, w)
    loss.backward()
    np.testing.assert_allclose(z_new.grad.numpy(), z_ref.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), z_ref.grad.numpy(), rtol=1e-12)
    state = SGBState.zeros(4)
    accumulate(state, grad, target, released)
    np.testing.assert_allclose(state.pos.numpy(), pos_ref.numpy(), rtol=1e-12)
    np.testing.assert_allclose(state.neg.numpy(), neg_ref.numpy(), rtol=1e-12)
    assert state.pos[2] == 0 and state.neg[2] == 0


@pytest.mark.parametrize("tail", [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [2, 5, 9], [4, 7]])
def test_random_release_matches_the_release_draw(tail):
    mask = torch.zeros(10, dtype=torch.bool)
    mask[tail] = True
    for seed in range(30):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ours = torch.nonzero(random_release(mask, g1)).flatten().tolist()
        ref = official_release(tail, 10, lambda: float(torch.rand((), generator=g2, dtype=torch.float64)))
        assert ours == ref
        assert ours[0] == tail[0]  # the first controlled class is released with probability 1
    one = torch.zeros(10, dtype=torch.bool)
    one[3] = True  # the release divides by zero here; fedlt releases the class
    assert random_release(one, torch.Generator().manual_seed(0)).nonzero().flatten().tolist() == [3]


def test_client_carries_its_balancer_state_across_rounds():
    """Two fits: the second starts from the first's returned state (P, Q grow; the controllers move on). Without
    the random release, which always releases the first controlled class (its P, Q stay 0)."""
    from fedlt.train import TensorData

    cfg = load_config(None, ["strategy.name=fedgrab", "train.local_steps=3", "train.batch_size=8",
                             "client.random_release=false"])
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randint(0, 255, (16, 1, 28, 28), dtype=torch.uint8, generator=g),
                      torch.tensor([0] * 10 + [1] * 4 + [2] * 2), torch.tensor([0.5]), torch.tensor([0.25]), 10)
    from fedlt.models.cnn import small_cnn

    client = FedGraBClient(cfg)
    config = {"lr": 0.01, "sgb-open": [1] * 10}
    r1 = client.fit(small_cnn(10, 1), data, config, torch.Generator().manual_seed(1), None)
    s1 = SGBState.from_config({**r1.metrics}, 10)
    assert (s1.pos[:3] > 0).all() and (s1.pos[3:] == 0).all() and (s1.neg > 0).any()
    assert s1.out.abs().sum() > 0
    r2 = client.fit(small_cnn(10, 1), data, {**config, **{k: r1.metrics[k] for k in r1.metrics
                                                          if k.startswith("sgb-")}},
                    torch.Generator().manual_seed(2), None)
    s2 = SGBState.from_config(r2.metrics, 10)
    assert (s2.pos >= s1.pos).all() and s2.pos.sum() > s1.pos.sum()  # P accumulates over the client's rounds


# --------------------------------------------------------------------------- the server: DPA and its split
def test_dpa_proportions_match_the_release():
    w = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [6.0, 8.0]])  # row norms 5, 1, 2, 10
    np.testing.assert_allclose(dpa_proportions(w), official_weno(np.linalg.norm(w, axis=1)), rtol=1e-12)
    assert dpa_proportions(w)[1] == 0  # the smallest class gets exactly 0 (hence the floor in strategy.prior=dpa)


def test_dpa_running_estimate_is_the_mean_over_calls():
    a = DirectPriorAnalyzer(3)
    w1, w2 = np.diag([1.0, 2.0, 4.0]), np.diag([3.0, 1.0, 2.0])
    a.update(w1)
    est = a.update(w2)
    expected = (official_weno(np.array([1.0, 2.0, 4.0])) + official_weno(np.array([3.0, 1.0, 2.0]))) / 2
    np.testing.assert_allclose(est, expected * DPA_ASSUMED_TOTAL, rtol=1e-12)


@pytest.mark.parametrize("dist,thresholds", [
    ([900, 1000, 780, 600, 700, 500, 550, 430, 100, 200], (75, 95)),
    ([900, 1000, 780, 600, 700, 500, 550, 430, 100, 200], (50, 90)),
    ([233.3, 562.4, 0.0, 374.0, 632.0, 1090.6, 1311.2, 1681.0, 1913.4, 2201.9], (75, 95)),
    ([5000, 3000, 1000, 500, 300, 100, 50, 30, 10, 10], (75, 95)),
    ([1, 1, 1, 1], (75, 95)),  # ties: index order
])
def test_shot_split_matches_the_release(dist, thresholds):
    assert shot_split(np.array(dist, dtype=float), thresholds) == official_shot_split(dist, thresholds)


def test_strategy_sends_the_tail_mask_and_keeps_each_clients_state(message_identity):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedlt.federation.records import to_arrays

    cfg = load_config(None, ["strategy.name=fedgrab", "strategy.prior=oracle"])
    s = FedGraB(cfg, 10)
    s.bind({0: 10, 1: 11})
    s.split = shot_split(np.array([5000, 3000, 1000, 500, 300, 100, 50, 30, 10, 10], dtype=float))
    assert s.train_config(1, 0)["sgb-open"] == [1 if c in s.split["tail"] else 0 for c in range(10)]
    assert load_config(None, ["strategy.name=fedgrab", "strategy.controlled=all"]).strategy.controlled == "all"
    state = {"sgb-pos": [1.0] * 10, "sgb-neg": [2.0] * 10, "sgb-out": [0.5] * 10, "sgb-err": [0.1] * 30}
    reply = Message(RecordDict({"arrays": to_arrays({"w": torch.ones(2)}),
                                "metrics": MetricRecord({"partition-id": 1, "num-examples": 3, "train_loss": 0.5,
                                                         **state})}),
                    reply_to=Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=11, message_type="train"))
    _, metrics = s.aggregate_checked(1, [reply])
    assert s.sgb[1] == state and not any(k.startswith("sgb-") for k in metrics)
    assert s.train_config(2, 1)["sgb-pos"] == [1.0] * 10 and "sgb-pos" not in s.train_config(2, 0)
    s2 = FedGraB(cfg, 10)
    s2.load_state_dict(s.state_dict())
    assert s2.sgb == s.sgb and s2.split == s.split


def test_fedgrab_simulation(tmp_path):
    from test_federated_methods import CIFAR_JPEG, simulate, tiny_config, write_tiny_lists

    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    lists = write_tiny_lists(tmp_path / "tiny")
    cfg = tiny_config(lists, "strategy.name=fedgrab", "federation.fraction=1.0")
    summary, rows = simulate(cfg, tmp_path / "run")
    assert summary["client"] == "fedgrab" and len(rows) == 2
    assert summary["prior_estimator"] == "dpa" and sorted(sum(summary["shot_split"].values(), [])) == list(range(10))
    assert summary["controlled_classes"] == sorted(summary["shot_split"]["tail"])
    assert len(summary["pi_hat"]) == 10 and summary["prior_l1"] >= 0
    assert not any(k.startswith("sgb-") for r in rows for k in r)  # the balancer state is no metric


def test_a_resumed_run_carries_each_clients_balancer_state(tmp_path, monkeypatch):
    """Killed after round 1 and resumed: round 2's clients get their round-1 controller state back from the
    checkpoint (the server holds it for the stateless ClientApp), so the final model and every balancer state
    equal the uninterrupted run's, bit for bit."""
    import shutil

    from test_bad_input import TINY, write_fashion

    from fedlt.federation.inprocess import run_inprocess
    from fedlt.rundir import RunDir

    torch.set_num_threads(1)
    write_fashion(tmp_path)
    cfg = load_config(None, [f"data.root={tmp_path}", *TINY, "mode=federated", "federation.rounds=2",
                             "federation.fraction=1", "train.local_steps=6", "train.lr=0.2", "strategy.name=fedgrab",
                             "strategy.controlled=all"])
    path, save = tmp_path / "run", RunDir.save_checkpoint

    def keep_first(self, state):
        save(self, state)
        if state["step"] == 1:
            shutil.copyfile(self.path / "checkpoint.pt", self.path / "step1.pt")

    monkeypatch.setattr(RunDir, "save_checkpoint", keep_first)
    run_inprocess(cfg, str(path))
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    whole = torch.load(path / "checkpoint.pt", weights_only=True)["state"]
    for name in ("summary.json", "done", "checkpoint.pt"):
        (path / name).unlink()
    (path / "step1.pt").replace(path / "checkpoint.pt")
    assert torch.load(path / "checkpoint.pt", weights_only=True)["state"]["strategy"]["sgb"]  # round 1's states
    run_inprocess(cfg, str(path))
    resumed = torch.load(path / "checkpoint.pt", weights_only=True)["state"]
    a, b = resumed["strategy"]["sgb"], whole["strategy"]["sgb"]
    assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[p][k]), torch.as_tensor(b[p][k]))
                                        for p in b for k in b[p])
    for k, v in whole["model"].items():
        assert torch.equal(resumed["model"][k], v), k
