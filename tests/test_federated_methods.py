"""Federated long-tail methods: client objectives on hand-written numbers and one federated run per strategy
on tiny data (CIFAR-10 JPEG subset, 4 clients, 2 rounds, 2 local steps), through the in-process engine
(fedlt.federation.inprocess, bit-identical to Flower's simulation engine) except DP with client-side clipping,
which runs through Flower's simulation engine with its client mod."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlt.config import load_config

CIFAR_JPEG = Path(__file__).resolve().parents[1] / "../shared/data/cifar10-jpeg"
if not CIFAR_JPEG.is_dir():
    CIFAR_JPEG = Path("/work/shared/data/cifar10-jpeg")


# --------------------------------------------------------------------------- tiny federated runs
def write_tiny_lists(root: Path) -> Path:
    """Long-tailed train list (40·0.1^(c/9) images of class c, 159 in all) and 10 test images per class."""
    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", lambda c: int(40 * 0.1 ** (c / 9))), ("test", lambda c: 10)):
        by = collections.defaultdict(list)
        for line in (CIFAR_JPEG / f"{split}.txt").read_text().splitlines():
            if line.strip():
                by[int(line.split()[-1])].append(line)
        lines = [l for c in range(10) for l in by[c][:per_class(c)]]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_lists(tmp_path_factory):
    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    return write_tiny_lists(tmp_path_factory.mktemp("tiny"))


def tiny_config(lists: Path, *overrides: str) -> dict:
    base = ["data.name=cifar10_files", f"data.root={CIFAR_JPEG}", f"data.train_list={lists / 'train.txt'}",
            f"data.test_list={lists / 'test.txt'}", "data.profile=none", "partition.num_clients=4",
            "partition.min_size=2", "federation.rounds=2", "federation.fraction=0.5", "train.local_steps=2",
            "model.name=small_cnn", "mode=federated", "eval.batch_size=256"]
    return load_config(None, base + list(overrides))


def simulate(cfg: dict, path: Path, flower: bool = False) -> tuple[dict, list[dict]]:
    """Run ``cfg`` in-process, or through Flower's simulation engine (Ray) when ``flower``."""
    torch.set_num_threads(1)
    from fedlt.federation.inprocess import run_inprocess
    from fedlt.federation.runner import run_federated

    summary = (run_federated if flower else run_inprocess)(cfg, str(path))
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert rows[0]["round"] == 0 and "accuracy" in rows[0]  # the initial model
    return summary, rows[1:]  # the rounds


# --------------------------------------------------------------------------- GBME
def test_gbme_joint_loss_by_hand():
    from clients.gbme import gbme_loss

    z = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # M=2, N=1, C=2
    log_pi = torch.log(torch.tensor([0.8, 0.2]))
    y = torch.tensor([0])
    expected = sum(-math.log(math.exp(a + math.log(0.8)) / (math.exp(a + math.log(0.8)) + math.exp(b + math.log(0.2))))
                   for a, b in ((1.0, 0.0), (0.0, 2.0)))
    assert gbme_loss(z, y, log_pi).item() == pytest.approx(expected, rel=1e-5)


def test_gbme_expert_phase_freezes_other_branches():
    from clients.gbme import GBMEClient
    from fedlt.models.experts import small_cnn_experts
    from fedlt.train import TensorData

    cfg = load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts"])
    model = small_cnn_experts(3, 1, num_experts=3)
    data = TensorData(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), torch.zeros(1),
                      torch.ones(1), 3)
    obj = GBMEClient(cfg).objective(model, data, {"log-prior": [-1.0, -1.0, -1.0], "expert": 1})
    assert [any(p.requires_grad for p in e.parameters()) for e in model.experts] == [False, True, False]
    assert all(p.requires_grad for p in model.stem.parameters())
    x = torch.randn(4, 1, 28, 28)
    loss = obj(model, x, data.labels)
    z1 = model.experts[1](model.stem(x))
    assert loss.item() == pytest.approx(F.cross_entropy(z1 - 1.0, data.labels).item(), rel=1e-5)  # no ×5 (the official release multiplies by 5)


@pytest.fixture(scope="module")
def gbme_run(tiny_lists, tmp_path_factory):
    cfg = tiny_config(tiny_lists, "strategy.name=gbme", "model.name=small_cnn_experts", "strategy.joint_fraction=0.5")
    return simulate(cfg, tmp_path_factory.mktemp("gbme") / "run")


def test_gbme_simulation(gbme_run):
    summary, rows = gbme_run
    assert summary["client"] == "gbme"
    pi_hat = np.asarray(summary["pi_hat"])
    assert pi_hat.shape == (10,) and pi_hat.sum() == pytest.approx(1) and (pi_hat > 0).all()
    assert summary["prior_l1"] >= 0 and summary["prior_kl"] >= 0
    assert min(summary["estimated_counts"]) >= 5
    groups = summary["expert_groups"]
    assert len(groups) == 3 and sorted(k for g in groups for k in g) == [0, 1, 2, 3]
    scores = summary["client_scores"]
    order = [k for g in groups for k in g]
    assert all(scores[a] >= scores[b] for a, b in zip(order, order[1:]))
    assert len(summary["expert_accuracy"]) == 3 and all(0 <= a <= 1 for a in summary["expert_accuracy"])
    assert isinstance(rows[0]["clients"][0], int)  # round 1: joint phase, one cohort
    # expert phase: the release's cohorts of S = 2 a round, β_g = 0.8 (S·β = 1.6): a group of one is the cohort
    # alone (int(1.6) − 1 = 0 others), a group of two int(1.6) = 1 of it and int(0.4) = 0 others (tests/test_prior.py)
    assert [len(set(c)) for c in rows[1]["clients"]] == [len(g) if len(g) <= 1.6 else 1 for g in groups]


# --------------------------------------------------------------------------- FedAvg aggregation
# --------------------------------------------------------------------------- logit calibration
def test_fedlc_loss_by_hand():
    from clients.fedlc import fedlc_loss, fedlc_offsets

    counts = torch.tensor([16.0, 1.0, 0.0])
    np.testing.assert_allclose(fedlc_offsets(counts, 0.5).numpy(), [0.25, 0.5, 0.5 * 1e2], rtol=1e-5)
    z = torch.tensor([[1.0, 2.0, 3.0]])
    a, b, c = 1 - 0.25, 2 - 0.5, 3 - 50
    expected = -(a - math.log(math.exp(a) + math.exp(b) + math.exp(c)))
    assert fedlc_loss(z, torch.tensor([0]), counts, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_local_loss_uses_the_local_prior():
    from clients.local_loss import LocalLossClient
    from fedlt.train import TensorData

    cfg = load_config(None, ["client.name=local_loss", "client.loss=balanced_softmax"])
    data = TensorData(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 1]), torch.zeros(1),
                      torch.ones(1), 2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
    obj = LocalLossClient(cfg).objective(model, data, {})
    expected = F.cross_entropy(model(x) + torch.log(torch.tensor([0.75, 0.25])), y)
    assert obj(model, x, y).item() == pytest.approx(expected.item(), rel=1e-5)
    cfg = load_config(None, ["client.name=local_loss", "client.loss=la", "client.loss_options={tau: 2}"])
    obj = LocalLossClient(cfg).objective(model, data, {})
    expected = F.cross_entropy(model(x) + 2 * torch.log(torch.tensor([0.75, 0.25])), y)
    assert obj(model, x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_posthoc_calibration_subtracts_log_prior():
    from strategies.posthoc_calibration import calibrate

    z = torch.tensor([[2.0, 1.0]])
    out = calibrate(z, np.array([0.8, 0.2]), 1.0)
    np.testing.assert_allclose(out.numpy(), [[2 - math.log(0.8), 1 - math.log(0.2)]], rtol=1e-6)
    assert out.argmax(1).item() == 1


def test_wrappers_nest_and_check_base_options():
    from fedlt.errors import FedLTError
    from fedlt.registry import STRATEGIES

    cfg = load_config(None, ["strategy.name=dp_server_fixed", "strategy.base=posthoc_calibration",
                             "strategy.base_options={base: ccvr, base_options: {base: fedprox, base_options: {mu: 0.5}}}"])
    from strategies.ccvr import CCVR
    from strategies.dp_server_fixed import DPServerFixed
    from strategies.fedprox import FedProx
    from strategies.posthoc_calibration import PosthocCalibration

    s = STRATEGIES.get("dp_server_fixed")(cfg, 10)
    assert isinstance(s, DPServerFixed) and isinstance(s.base, PosthocCalibration)
    assert isinstance(s.base.base, CCVR) and type(s.base.base.base) is FedProx
    inner = s.base.base.base
    assert inner.opts.mu == 0.5 and s.train_config(1, 0) == {"proximal-mu": 0.5}
    assert s.base.base.opts.num_virtual == 200 and s.base.opts.tau == 1.0
    assert isinstance(STRATEGIES.get("ccvr")(load_config(None, ["strategy.name=ccvr"]), 10), CCVR)
    # one copy of the loop's state, the innermost strategy's; its round calls the outermost wrapper's hooks
    s.bind({0: 10, 1: 11})
    s.fit_seconds = 2.0
    assert inner.node_of == {0: 10, 1: 11} and inner.fit_seconds == 2.0 and s.num_clients == 2
    assert inner.outer is s and s.base.outer is s
    with pytest.raises(FedLTError, match="strategy.base_options.nope"):  # refused when the config is read
        load_config(None, ["strategy.name=posthoc_calibration", "strategy.base_options={nope: 1}"])


# --------------------------------------------------------------------------- CCVR
def test_pooled_stats_equal_union_statistics():
    from strategies.ccvr import class_feature_stats, pool_class_stats

    rng = np.random.default_rng(0)
    C, d = 3, 4
    hs = [torch.as_tensor(rng.normal(size=(n, d)) + k) for k, n in enumerate((7, 5, 1))]
    ys = [torch.as_tensor(rng.integers(0, 2, size=len(h))) for h in hs]  # class 2 held by nobody
    stats = [class_feature_stats(h, y, C) for h, y in zip(hs, ys)]
    mu, cov, counts = pool_class_stats(*(np.stack([s[k] for s in stats]) for k in ("mean", "cov", "count")))
    h_all, y_all = torch.cat(hs), torch.cat(ys)
    for c in range(2):
        hc = h_all[y_all == c].numpy()
        assert counts[c] == len(hc)
        np.testing.assert_allclose(mu[c], hc.mean(0), atol=1e-10)
        np.testing.assert_allclose(cov[c], np.cov(hc, rowvar=False), atol=1e-10)  # unbiased (n − 1)
    assert counts[2] == 0 and not mu[2].any() and not cov[2].any()


def test_virtual_sampling_same_count_per_class():
    from strategies.ccvr import sample_virtual

    mu = np.array([[0.0, 0.0], [5.0, -5.0], [0.0, 0.0]])
    cov = np.stack([np.eye(2), np.diag([4.0, 0.0]), np.eye(2)])  # class 1 singular: the ridge makes it sampleable
    feats, labels = sample_virtual(mu, cov, np.array([10, 3, 0]), 4000, 1e-4, torch.Generator().manual_seed(0))
    assert torch.bincount(labels).tolist() == [4000, 4000]  # class 2 has no data: no virtual features
    f1 = feats[labels == 1].double()
    np.testing.assert_allclose(f1.mean(0).numpy(), [5, -5], atol=0.1)
    np.testing.assert_allclose(f1.var(0).numpy(), [4, 1e-4], rtol=0.1)


def test_fit_classifier_learns_separable_features():
    from strategies.ccvr import fit_classifier

    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(50, 2, generator=g) + 3, torch.randn(50, 2, generator=g) - 3])
    labels = torch.tensor([0] * 50 + [1] * 50)
    clf0 = torch.nn.Linear(2, 2)
    before = clf0.weight.detach().clone()
    clf = fit_classifier(clf0, feats, labels, 5, 0.1, 16, g)
    assert (clf(feats).argmax(1) == labels).float().mean() > 0.95
    assert torch.equal(clf0.weight, before)


# --------------------------------------------------------------------------- CReFF
def test_average_class_grads_over_holders_only():
    from strategies.creff import average_class_grads

    gw = [np.full((2, 2, 3), 1.0), np.full((2, 2, 3), 3.0)]
    gb = [np.full((2, 2), 1.0), np.full((2, 2), 3.0)]
    has = [np.array([1, 1]), np.array([1, 0])]
    w, b, present = average_class_grads(gw, gb, has)
    assert (w[0] == 2).all() and (w[1] == 1).all() and (b[0] == 2).all() and (b[1] == 1).all()
    assert present.tolist() == [True, True]


def test_gradient_distance_and_matching():
    from strategies.creff import gradient_distance, match_features

    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # the official distance_wb: Σ_rows 1 − ⟨g, t⟩/(‖g‖‖t‖ + 1e-6); two unit rows of W and the bias row of norm √2 give 3·(1 − 1/(1 + 1e-6))
    t64, b64 = t.double(), torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert gradient_distance(t64, b64, t64, b64).item() == pytest.approx(
        2 * (1 - 1 / (1 + 1e-6)) + (1 - 2 / (2 + 1e-6)), abs=1e-12)
    assert gradient_distance(-t, torch.tensor([1.0, 1.0]), t, torch.tensor([-1.0, -1.0])).item() == pytest.approx(6)
    torch.manual_seed(0)
    W, b = torch.randn(3, 4), torch.zeros(3)
    real = torch.rand(20, 4) + torch.tensor([2.0, 0, 0, 0])
    Wr, br = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    tw, tb = torch.autograd.grad(F.cross_entropy(real @ Wr.T + br, torch.zeros(20, dtype=torch.long)), [Wr, br])
    target_w, target_b = torch.zeros(3, 3, 4), torch.zeros(3, 3)
    target_w[0], target_b[0] = tw, tb
    present = np.array([True, False, False])
    f0 = torch.randn(3, 5, 4)

    def dist(f):
        Wg, bg = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
        gw, gb = torch.autograd.grad(F.cross_entropy(f[0] @ Wg.T + bg, torch.zeros(5, dtype=torch.long)), [Wg, bg])
        return gradient_distance(gw, gb, tw, tb).item()

    f1 = match_features(f0, W, b, target_w, target_b, present, 50, 0.1)
    assert dist(f1) < dist(f0)
    assert torch.equal(f1[1:], f0[1:])  # absent classes untouched


# --------------------------------------------------------------------------- DP accountant
def test_rdp_accountant():
    from opacus.accountants.analysis.rdp import compute_rdp

    from fedlt.federation.dp import ORDERS, epsilon

    # q = 1: the Gaussian mechanism's closed form ε_RDP(α) = α / (2σ²)
    assert compute_rdp(q=1.0, noise_multiplier=2.0, steps=1, orders=[5])[0] == pytest.approx(5 / 8)
    assert compute_rdp(q=1 - 1e-12, noise_multiplier=2.0, steps=1, orders=[5])[0] == pytest.approx(5 / 8, rel=1e-6)
    # ... composed 3 times and converted by Balle et al. 2020, Thm. 21, by hand
    eps, order = epsilon(1.0, 2.0, 3, 1e-5)
    assert eps == pytest.approx(min(3 * a / 8 + math.log((a - 1) / a) - (math.log(1e-5) + math.log(a)) / (a - 1)
                                    for a in range(2, 257)))
    assert order in ORDERS
    # Abadi et al.'s MNIST setting (q = 256/60000, σ = 1.1, 60 epochs, δ = 1e-5): ε ≈ 3 with integer orders and
    # the classic conversion log(1/δ)/(α − 1); Balle et al.'s at the best order α = 8 is lower by
    # log(8)/7 − log(7/8) = 0.43
    assert epsilon(256 / 60000, 1.1, 14062, 1e-5) == (pytest.approx(2.60, abs=0.005), 8)
    assert epsilon(0.1, 1.0, 10, 1e-5)[0] < epsilon(0.2, 1.0, 10, 1e-5)[0] < epsilon(0.2, 1.0, 20, 1e-5)[0]
    assert epsilon(0.5, 1.0, 0, 0.1) == (0.0, 2) and epsilon(0.5, 0.0, 5, 0.1)[0] == math.inf


@pytest.mark.parametrize("q, sigma, steps, expected", [(0.5, 1.0, 20, 8.06), (0.5, 2.0, 10, 1.30)])
def test_dp_epsilon_is_opacus_rdp(q, sigma, steps, expected):
    """The figures that the hand-written accountant reported as 9.45 and 2.25 (its cruder RDP → (ε, δ))."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedlt.federation.dp import ORDERS, epsilon

    delta = 0.1
    eps, order = epsilon(q, sigma, steps, delta)
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(ORDERS))
    assert (eps, order) == pytest.approx(get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta), rel=1e-12)
    assert round(eps, 2) == expected


def test_dp_privacy_block_names_the_accountant():
    from fedlt.registry import STRATEGIES

    cfg = load_config(None, ["strategy.name=dp_server_fixed", "strategy.delta=0.1"])
    strategy = STRATEGIES.get("dp_server_fixed")(cfg, 10)
    strategy.bind({pid: 100 + pid for pid in range(4)})
    strategy.releases, strategy.sampled = 20, 2  # 20 releases at q = 2/4, σ = 1
    p = strategy.privacy_spent()
    assert p["accountant"].startswith("opacus.accountants.analysis.rdp")
    assert round(p["epsilon"], 2) == 8.06 and p["sampling_rate"] == 0.5 and p["delta"] == 0.1


def test_dp_without_opacus_is_a_one_line_error_when_the_config_is_read(monkeypatch):
    import sys

    from fedlt.errors import FedLTError

    monkeypatch.setitem(sys.modules, "opacus", None)  # as if not installed
    for name in ("dp_server_fixed", "dp_client_fixed"):
        with pytest.raises(FedLTError, match=r"pip install 'fedlt\[dp\]' \(or pip install opacus\)"):
            load_config(None, [f"strategy.name={name}"])
    assert load_config(None, ["strategy.name=fedavg"]).strategy.name == "fedavg"  # other runs do not need it


def test_dp_server_fixed_clips_averages_and_adds_noise_by_hand(message_identity):
    """Flower's server-side fixed clipping: w_t + mean_k(Δ_k·min(1, C/‖Δ_k‖)) + N(0, (σ·C/S)²), S the clients
    sent to; a BatchNorm step counter is held at w_t's (it counted in ‖Δ‖ and scaled a 0.14 update by 1/50)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedlt.registry import STRATEGIES

    def make(sigma: float):
        s = STRATEGIES.get("dp_server_fixed")(load_config(None, [
            "strategy.name=dp_server_fixed", "strategy.clipping_norm=1", f"strategy.noise_multiplier={sigma}"]), 10)
        s.bind({0: 100, 1: 101})
        s.begin_round(1)
        return s

    w0 = {"w": torch.zeros(2), "num_batches_tracked": torch.tensor(0)}

    def reply(pid: int, n: int, w: list[float], size: int = 2) -> Message:
        arrays = {"w": torch.tensor(w), "num_batches_tracked": torch.tensor(50)} if size == 2 else \
            {"w": torch.full((size,), w[0]), "num_batches_tracked": torch.tensor(50)}
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(
            {"num-examples": n, "partition-id": pid, "train_loss": 0.0})}), dst_node_id=0, message_type="train")

    s = make(0.0)
    s.messages([0, 1], ArrayRecord(w0), ConfigRecord({}), "train", 1)
    out, _ = s.aggregate_train(1, [reply(0, 10, [0.1, 0.0]), reply(1, 30, [3.0, 4.0])])  # ‖Δ‖ = 0.1 and 5
    state = out.to_torch_state_dict()
    # uniform weights: (0.1 + 3/5) / 2 and (0 + 4/5) / 2; the counter stays w_t's
    assert torch.allclose(state["w"], torch.tensor([0.35, 0.4])) and state["num_batches_tracked"].item() == 0
    s = make(1.0)  # noise std σ·C/S = 1/2 on every entry of the mean
    big = {"w": torch.zeros(20000), "num_batches_tracked": torch.tensor(0)}
    s.messages([0, 1], ArrayRecord(big), ConfigRecord({}), "train", 1)
    out, _ = s.aggregate_train(1, [reply(0, 1, [1e-3], 20000), reply(1, 1, [1e-3], 20000)])  # ‖Δ‖ < C
    assert out["w"].numpy().mean() == pytest.approx(1e-3, abs=0.02) and out["w"].numpy().std() == pytest.approx(
        0.5, rel=0.03)


def test_dp_server_fixed_clips_the_model_record_alone(message_identity):
    """Over FedROD a reply also carries the personal head: Flower clipped it against w_t's arrays (a ValueError
    on mismatched shapes); now the model is clipped and the head reaches FedROD untouched."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from clients.fedrod import PERSONAL
    from fedlt.registry import STRATEGIES

    s = STRATEGIES.get("dp_server_fixed")(load_config(None, [
        "strategy.name=dp_server_fixed", "strategy.base=fedrod", "client.name=fedrod", "strategy.clipping_norm=1",
        "strategy.noise_multiplier=0"]), 10)
    s.bind({0: 100})
    s.begin_round(1)
    w0 = {"f.weight": torch.zeros(3), "classifier.weight": torch.zeros(2), "classifier.bias": torch.zeros(1)}
    s.messages([0], ArrayRecord(w0), ConfigRecord({}), "train", 1)
    head = {"weight": torch.full((2,), 9.0), "bias": torch.full((1,), 9.0)}
    new = {**w0, "f.weight": torch.tensor([3.0, 4.0, 0.0])}
    reply = Message(RecordDict({"arrays": ArrayRecord(new), PERSONAL: ArrayRecord(head), "metrics": MetricRecord(
        {"num-examples": 5, "partition-id": 0, "train_loss": 0.0})}), dst_node_id=0, message_type="train")
    out, _ = s.aggregate_train(1, [reply])
    assert torch.allclose(out.to_torch_state_dict()["f.weight"], torch.tensor([0.6, 0.8, 0.0]))  # ‖Δ‖ = 5 -> 1
    assert all(torch.equal(s.base.personal[0][k], head[k]) for k in head)


# --------------------------------------------------------------------------- composed run: DP ∘ posthoc ∘ CCVR ∘ FedLC
@pytest.fixture(scope="module")
def composed_run(tiny_lists, tmp_path_factory):
    cfg = tiny_config(tiny_lists, "strategy.name=dp_server_fixed", "strategy.base=posthoc_calibration",
                      "strategy.base_options={base: ccvr, base_options: {base: fedlc, num_virtual: 20, epochs: 2}}",
                      "client.name=fedlc", "strategy.noise_multiplier=0.5", "strategy.clipping_norm=5")
    return simulate(cfg, tmp_path_factory.mktemp("composed") / "run")


def test_composed_simulation(composed_run):
    summary, rows = composed_run
    assert summary["client"] == "fedlc" and len(rows) == 2
    # posthoc calibration: π̂ against π, metrics with π̂ (the run's own) and with the true π
    assert len(summary["pi_hat"]) == 10 and summary["prior_l1"] >= 0 and summary["prior_kl"] >= 0
    assert summary["posthoc_estimated_prior"]["accuracy"] == pytest.approx(summary["accuracy"])
    assert {"uncalibrated", "true_prior"} <= {k[len("posthoc_"):] for k in summary if k.startswith("posthoc_")}
    # CCVR calibrated after the last round
    assert summary["ccvr_rounds"] == [2] and "accuracy" in summary["ccvr_uncalibrated"]
    # DP: two releases at q = 2/4
    p = summary["privacy"]
    assert p["releases"] == 2 and p["sampling_rate"] == 0.5 and p["delta"] == 0.25 and 0 < p["epsilon"] < math.inf


# --------------------------------------------------------------------------- CReFF (+ a zoo loss on every client)
@pytest.fixture(scope="module")
def creff_run(tiny_lists, tmp_path_factory):
    cfg = tiny_config(tiny_lists, "strategy.name=creff", "strategy.num_features=10", "strategy.match_steps=5",
                      "strategy.crt_epochs=5", "strategy.repeats=2", "strategy.batch_real=8",
                      "client.name=local_loss", "client.loss=balanced_softmax")
    return simulate(cfg, tmp_path_factory.mktemp("creff") / "run")


def test_creff_simulation(creff_run):
    summary, rows = creff_run
    assert summary["client"] == "local_loss" and len(rows) == 2
    assert "accuracy" in summary["creff_base_classifier"]
    assert 0 <= summary["accuracy"] <= 1


@pytest.mark.parametrize("client", ["tde", "fedetf", "sbcl"])
def test_creff_under_a_client_that_replaces_the_head_is_refused_when_read(client):
    """TDE's causal-norm head (FedETF's projection, SBCL's normed classifier) has no classifier.weight /
    classifier.bias for CReFF to re-train: refused when the config is read, naming the client method (it was
    found at round 1, past --dry-run)."""
    from fedlt.errors import FedLTError

    with pytest.raises(FedLTError, match=f"and client.name={client} replaces it by .*: use a client method that "
                                         f"keeps the model's linear classifier"):
        load_config(None, ["mode=federated", "strategy.name=creff", f"client.name={client}"])


def test_every_client_method_that_replaces_the_linear_classifier_says_so():
    """``ClientMethod.replaced_head`` is what CReFF's config check reads: it must be set exactly for the client
    methods whose adapted single-network model lacks an nn.Linear ``classifier`` (weight and bias)."""
    from types import SimpleNamespace

    from fedlt.errors import FedLTError
    from fedlt.experiment import model_for
    from fedlt.registry import CLIENTS

    stand_in = SimpleNamespace(num_classes=10, in_channels=1, train=None)  # no images: no input-size check
    checked = []
    for name in CLIENTS:
        method = CLIENTS.get(name)
        try:
            cfg = load_config(None, ["mode=federated", f"strategy.name={method.strategy or 'fedavg'}",
                                     f"client.name={name}"])
        except FedLTError:  # an expert method: CReFF refuses multi-expert models anyway
            continue
        state = model_for(cfg, stand_in).state_dict()
        keeps = "classifier.weight" in state and "classifier.bias" in state
        assert (method.replaced_head is None) == keeps, name
        checked.append(name)
    assert {"tde", "fedetf", "sbcl", "fedavg", "fedprox"} <= set(checked)


# --------------------------------------------------------------------------- DP with client-side clipping
def test_client_clipping_mod_clips_train_updates_that_ask_for_it(message_identity):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from fedlt.federation.dp import client_clipping_mod

    w0 = {"a": torch.zeros(3), "b": torch.ones(2), "num_batches_tracked": torch.tensor(7)}
    # ‖Δ‖ = 5; a BatchNorm step counter is no weight: it stays w_t's and out of the norm
    update = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([0.0, 4.0]),
              "num_batches_tracked": torch.tensor(50)}

    def call(message_type: str, config: dict) -> dict:
        msg = Message(RecordDict({"arrays": ArrayRecord(w0), "config": ConfigRecord(config)}),
                      dst_node_id=0, message_type=message_type)

        def call_next(m, ctx):
            new = {k: w0[k] + update[k] for k in w0}
            return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"n": 1})}), reply_to=m)

        ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        out = client_clipping_mod(msg, ctx, call_next)
        return out.content["arrays"].to_torch_state_dict()

    clipped = call("train", {KEY_CLIPPING_NORM: 1.0, "lr": 0.1})
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0, 0.0]))  # Δ · 1/5
    assert torch.allclose(clipped["b"], torch.tensor([1.0, 1.8])) and clipped["num_batches_tracked"].item() == 7

    # a personal head in the message and in the reply (FedROD): the client sees it, it comes back unclipped
    head_in, head_out = {"h": torch.full((2,), 2.0)}, {"h": torch.full((2,), 9.0)}
    msg = Message(RecordDict({"arrays": ArrayRecord(w0), "fedrod-personal": ArrayRecord(head_in),
                              "config": ConfigRecord({KEY_CLIPPING_NORM: 1.0})}), dst_node_id=0, message_type="train")

    def train_with_head(m, ctx):
        assert torch.equal(m.content["fedrod-personal"].to_torch_state_dict()["h"], head_in["h"])
        new = {k: w0[k] + update[k] for k in w0}
        return Message(RecordDict({"arrays": ArrayRecord(new), "fedrod-personal": ArrayRecord(head_out),
                                   "metrics": MetricRecord({"n": 1})}), reply_to=m)

    ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    out = client_clipping_mod(msg, ctx, train_with_head)
    assert not out.has_error()
    assert torch.allclose(out.content["arrays"].to_torch_state_dict()["a"], torch.tensor([0.6, 0.0, 0.0]))
    assert torch.equal(out.content["fedrod-personal"].to_torch_state_dict()["h"], head_out["h"])
    assert torch.allclose(call("train", {KEY_CLIPPING_NORM: 10.0})["a"], update["a"])  # ‖Δ‖ < C: unchanged
    assert torch.allclose(call("train", {"lr": 0.1})["a"], update["a"])  # no DP asked: untouched
    assert torch.allclose(call("query", {KEY_CLIPPING_NORM: 1.0})["a"], update["a"])  # only train replies


@pytest.mark.slow
def test_dp_client_fixed_simulation_moves_the_model_at_most_c_per_round(tiny_lists, tmp_path):
    from fedlt.experiment import experiment_for, model_for

    C = 1e-3
    cfg = tiny_config(tiny_lists, "strategy.name=dp_client_fixed", f"strategy.clipping_norm={C}",
                      "strategy.noise_multiplier=0")
    summary, rows = simulate(cfg, tmp_path / "run", flower=True)
    w0 = model_for(cfg, experiment_for(cfg)).state_dict()
    w2 = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]["model"]
    moved = torch.sqrt(sum(((w2[k].double() - w0[k].double()) ** 2).sum() for k in w0)).item()
    # without noise, each round's global step is the mean of updates clipped to C on the clients
    assert 0 < moved <= 2 * C * (1 + 1e-4)
    assert summary["privacy"]["clipping"] == "client" and summary["privacy"]["releases"] == 2
    assert summary["privacy"]["epsilon"] == math.inf  # σ = 0: no privacy, said as such
    # the in-process engine applies the same client mod: the same weights to the bit
    inprocess, _ = simulate(cfg, tmp_path / "inprocess")
    w2_inprocess = final_weights(tmp_path / "inprocess")
    assert all(torch.equal(w2[k], w2_inprocess[k]) for k in w2) and inprocess["accuracy"] == summary["accuracy"]


def test_dp_client_fixed_over_fedrod_runs(tiny_lists, tmp_path):
    """Flower's client mod takes one ArrayRecord: FedROD's personal head record used to fail round 1."""
    cfg = tiny_config(tiny_lists, "strategy.name=dp_client_fixed", "strategy.base=fedrod",
                      "strategy.clipping_norm=0.5", "strategy.noise_multiplier=0")
    summary, rows = simulate(cfg, tmp_path / "run")
    assert len(rows) == 2 and summary["failures"]["total"] == 0 and summary["privacy"]["releases"] == 2


def test_dp_options_are_checked_before_training():
    from fedlt.errors import FedLTError

    for bad in ("strategy.clipping_norm=0", "strategy.noise_multiplier=-1", "strategy.delta=1"):
        with pytest.raises(FedLTError, match=bad.split("=")[0]):
            load_config(None, ["strategy.name=dp_client_fixed", bad])


# --------------------------------------------------------------------------- FedProx, FedAvgM, FedLC
def test_fedprox_objective_by_hand():
    from clients.fedprox import FedProxClient

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    objective = FedProxClient(load_config(None, ["strategy.name=fedprox"])).objective(model, None,
                                                                                      {"proximal-mu": 0.4})
    with torch.no_grad():  # move away from the round's global weights: ‖w − w_t‖² = 0.5² + 1² = 1.25
        model.weight[0, 0] += 0.5
        model.bias[1] -= 1.0
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    expected = F.cross_entropy(model(x), y).item() + 0.5 * 0.4 * 1.25
    assert objective(model, x, y).item() == pytest.approx(expected, rel=1e-6)


def test_fedavgm_server_momentum_by_hand(message_identity):
    from flwr.app import ArrayRecord
    from test_federation import reply

    from strategies.fedavgm import FedAvgM

    def make():
        s = FedAvgM(load_config(None, ["strategy.name=fedavgm", "strategy.momentum=0.5", "strategy.server_lr=1"]), 10)
        s.current_arrays = ArrayRecord({"w": torch.full((2, 2), 1.0)})  # w_0 (configure_train sets it)
        return s

    s = make()
    w1, _ = s.aggregate_train(1, [reply(0, 10, 0.0), reply(1, 30, 0.0)])  # Δ = 1, v = 1, w = 1 − 1
    assert np.allclose(w1["w"].numpy(), 0.0)
    w2, _ = s.aggregate_train(2, [reply(0, 10, -2.0), reply(1, 30, -2 / 3)])  # mean −1: Δ = 1, v = 1.5
    assert np.allclose(w2["w"].numpy(), -1.5)
    resumed = make()
    resumed.load_state_dict(s.state_dict())  # the checkpointed momentum and weights carry on identically
    a, _ = s.aggregate_train(3, [reply(0, 1, 0.0)])
    b, _ = resumed.aggregate_train(3, [reply(0, 1, 0.0)])
    assert np.allclose(a["w"].numpy(), -1.5 - (0.5 * 1.5 - 1.5)) and np.array_equal(a["w"].numpy(), b["w"].numpy())


def test_fedavgm_steps_the_parameters_and_averages_batchnorm_statistics(message_identity):
    """Flower's step on running_var: 1 → 0.05 (Δ = 0.95, v = 0.95), then v = 0.9·0.95 → 0.05 − 0.855 < 0."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from strategies.fedavgm import FedAvgM

    def bn_reply(pid, n, w, var):
        arrays = ArrayRecord({"conv.weight": torch.full((2,), w), "bn.running_var": torch.full((2,), var),
                              "bn.num_batches_tracked": torch.tensor(5 * pid + 6)})
        metrics = MetricRecord({"num-examples": n, "partition-id": pid, "train_loss": 0.0})
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), dst_node_id=0,
                       message_type="train")

    s = FedAvgM(load_config(None, ["strategy.name=fedavgm", "strategy.momentum=0.9", "strategy.server_lr=1"]), 10)
    s.current_arrays = ArrayRecord({"conv.weight": torch.ones(2), "bn.running_var": torch.ones(2),
                                    "bn.num_batches_tracked": torch.tensor(0)})
    s.aggregate_train(1, [bn_reply(0, 1, 0.0, 0.05), bn_reply(1, 3, 0.0, 0.05)])  # Δ = 1 on the weight
    w2, _ = s.aggregate_train(2, [bn_reply(0, 1, 0.0, 0.02), bn_reply(1, 3, 0.0, 0.06)])  # Δ = 0, v = 0.9
    assert np.allclose(w2["conv.weight"].numpy(), -0.9)  # the parameter: Flower's momentum step
    assert np.allclose(w2["bn.running_var"].numpy(), 0.25 * 0.02 + 0.75 * 0.06)  # the statistic: the mean
    # num_batches_tracked: 0.25·6 + 0.75·11 = 9.75, rounded
    assert w2["bn.num_batches_tracked"].numpy() == 10 and w2["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert np.allclose(s.current_arrays["bn.running_var"].numpy(), 0.05)  # w_t of the next round holds it too


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "checkpoint.pt", weights_only=True)["state"]["model"]


def distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a))


@pytest.fixture(scope="module")
def baseline_runs(tiny_lists, tmp_path_factory):
    """The same tiny federation under fedavg, fedprox (μ = 30), fedlc (τ = 0) and fedavgm (β = 0.9)."""
    from fedlt.experiment import experiment_for, model_for

    root = tmp_path_factory.mktemp("baselines")
    runs = {}
    for name, extra in (("fedavg", []), ("fedprox", ["strategy.mu=30"]), ("fedlc", ["strategy.tau=0"]),
                        ("fedavgm", ["strategy.momentum=0.9"])):
        cfg = tiny_config(tiny_lists, f"strategy.name={name}", *extra)
        summary, rows = simulate(cfg, root / name)
        runs[name] = (summary, rows, final_weights(root / name), root / name)
    runs["w0"] = model_for(cfg, experiment_for(cfg)).state_dict()
    return runs


def test_fedprox_simulation_pulls_clients_towards_the_global_model(baseline_runs):
    w0 = baseline_runs["w0"]
    summary, rows, w, _ = baseline_runs["fedprox"]
    assert summary["client"] == "fedprox" and len(rows) == 2
    # μ = 30 reaches the clients: the model moves well under FedAvg's distance from w_0
    assert distance(w, w0) < 0.8 * distance(baseline_runs["fedavg"][2], w0)


def test_fedlc_simulation_with_tau_zero_is_fedavg(baseline_runs):
    summary, rows, w, _ = baseline_runs["fedlc"]
    assert summary["client"] == "fedlc"
    # τ reaches the clients (their default is 0.5), and τ = 0 makes the calibrated loss plain CE
    fedavg = baseline_runs["fedavg"]
    assert all(torch.equal(w[k], fedavg[2][k]) for k in w) and summary["accuracy"] == fedavg[0]["accuracy"]


def test_fedavgm_simulation_keeps_server_momentum(baseline_runs):
    summary, rows, w, path = baseline_runs["fedavgm"]
    state = torch.load(path / "checkpoint.pt", weights_only=True)["state"]["strategy"]
    assert state["momentum"] is not None and len(state["momentum"]) == len(w)
    # the server's current weights are the checkpointed global model, and momentum made it differ from FedAvg
    assert all(np.array_equal(c, w[k].numpy()) for k, c in zip(state["keys"], state["current"]))
    assert distance(w, baseline_runs["fedavg"][2]) > 0


def test_gbme_oracle_prior_ablation_sends_the_true_log_prior():
    from fedlt.errors import FedLTError
    from fedlt.experiment import experiment_for
    from strategies.gbme import GBME
    from strategies.gbme.prior import PriorEstimate

    pi_hat = np.full(10, 0.1)
    for prior in ("estimated", "oracle"):
        cfg = load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts", f"strategy.prior={prior}"])
        s = GBME(cfg, 10)
        s.prior = PriorEstimate(np.zeros((1, 10)), np.zeros((1, 10)), np.zeros(10), pi_hat)
        counts = experiment_for(cfg).train_counts
        expected = np.log(counts / counts.sum()) if prior == "oracle" else np.log(pi_hat)
        np.testing.assert_allclose(s.train_config(3, 0)["log-prior"], expected)
    with pytest.raises(FedLTError, match="strategy.prior"):
        load_config(None, ["strategy.name=gbme", "strategy.prior=true"])


# --------------------------------------------------------------------------- in-process rounds (no Ray)
class InProcessGrid:
    """A Flower Grid stand-in that hands each message to the ClientApp in this process (node id = pid + 1)."""

    def __init__(self, cfg, num_clients: int) -> None:
        from fedlt.federation.apps import make_client_app

        self.app, self.num_clients = make_client_app(cfg), num_clients

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_clients + 1))

    def send_and_receive(self, messages, timeout=None) -> list:
        from flwr.app import Context, RecordDict

        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=0, node_id=node, node_config={"partition-id": node - 1}, state=RecordDict(),
                          run_config={})
            reply = self.app(msg, ctx)
            reply.metadata.__dict__["_src_node_id"] = node  # what the SuperLink would stamp
            out.append(reply)
        return out


@pytest.mark.parametrize("wrapper", ["ccvr", "creff"])
def test_run_resumed_after_its_last_checkpoint_reports_the_calibrated_model(wrapper, tiny_lists, tmp_path,
                                                                          message_identity):
    from fedlt.experiment import experiment_for, model_for
    from fedlt.federation.records import load_into, to_arrays
    from fedlt.federation.server import run_rounds
    from fedlt.registry import STRATEGIES
    from fedlt.rundir import RunDir

    torch.set_num_threads(1)
    extra = (["strategy.num_virtual=20", "strategy.epochs=2"] if wrapper == "ccvr" else
             ["strategy.num_features=5", "strategy.match_steps=2", "strategy.crt_epochs=2", "strategy.repeats=1",
              "strategy.batch_real=4"])
    cfg = tiny_config(tiny_lists, f"strategy.name={wrapper}", *extra)
    path = tmp_path / "run"
    first = run_rounds(InProcessGrid(cfg, 4), cfg, RunDir(path))
    for name in ("summary.json", "done"):  # as if stopped between the last checkpoint and the summary
        (path / name).unlink(missing_ok=True)
    again = run_rounds(InProcessGrid(cfg, 4), cfg, RunDir(path))
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 3  # round 0 and 2 rounds: no round ran again
    for key in ("accuracy", "balanced_accuracy", "per_class", "ece"):
        assert again[key] == first[key], key
    # the checkpointed strategy evaluates the global weights with the classifier of their round
    ckpt = torch.load(path / "checkpoint.pt", weights_only=True)
    exp = experiment_for(cfg)
    strategy = STRATEGIES.get(wrapper)(cfg, exp.num_classes)
    strategy.load_state_dict(ckpt["state"]["strategy"])
    strategy.global_arrays = to_arrays(ckpt["state"]["model"])
    model = load_into(model_for(cfg, exp), strategy.global_arrays)
    evaluated = strategy.eval_model(model)
    assert evaluated is not model and torch.equal(evaluated.classifier.weight, strategy.classifier["weight"])
    assert not torch.equal(evaluated.classifier.weight, model.classifier.weight)


def test_replies_detach_and_move_every_tensor_to_the_cpu(message_identity):
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedlt.client_method import FitResult
    from fedlt.federation.apps import _reply

    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0]]))  # requires grad: Flower cannot take it as it is
    grad = (w * 3).sum(1)  # attached to a graph
    result = FitResult(state={"w": w}, metrics={"num-examples": 2},
                       extra_arrays={"grads": {"g": grad, "n": np.array([1.0, 0.0])}})
    msg = Message(RecordDict({"config": ConfigRecord({"action": "x"})}), dst_node_id=0, message_type="query")
    reply = _reply(msg, result, 3)
    assert torch.equal(reply.content["arrays"].to_torch_state_dict()["w"], torch.tensor([[1.0, 2.0]]))
    assert reply.content["grads"]["g"].numpy().tolist() == [9.0]
    assert reply.content["grads"]["n"].numpy().tolist() == [1.0, 0.0]
    assert reply.content["metrics"]["partition-id"] == 3
