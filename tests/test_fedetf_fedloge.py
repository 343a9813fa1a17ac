"""FedETF and FedLoGe: each formula against a transcription of the official arithmetic (ZexiLee/ICCV-2023-FedETF,
ZackZikaiXiao/FedLoGe) on hand-made inputs, personalisation, the per-client head's round trip, and one tiny
federated run of each (in-process engine)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.models.base import SplitModel
from fedlt.models.cnn import small_cnn
from fedlt.train import TensorData


def _tiny_data(n: int = 24, num_classes: int = 4, seed: int = 0, labels: list[int] | None = None) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels) if labels is not None else torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randint(0, 256, (len(y), 1, 8, 8), dtype=torch.uint8, generator=g)
    return TensorData(images, y, torch.tensor([0.5]), torch.tensor([0.25]), num_classes)


# --------------------------------------------------------------------------- FedETF
def official_proto(a: np.ndarray) -> torch.Tensor:
    """models_dict/proto_classifiers.py, Proto_Classifier.__init__, with ``a`` in place of np.random.random."""
    num_classes = a.shape[1]
    P, _ = np.linalg.qr(a)
    P = torch.tensor(P).float()
    I = torch.eye(num_classes)
    one = torch.ones(num_classes, num_classes)
    return np.sqrt(num_classes / (num_classes - 1)) * torch.matmul(P, I - ((1 / num_classes) * one))


def test_simplex_etf_matches_official_proto():
    from clients.fedetf import simplex_etf

    a = np.random.default_rng(0).random((12, 5))
    m = simplex_etf(torch.from_numpy(a))
    assert torch.allclose(m, official_proto(a), atol=1e-6)
    assert torch.allclose(m.norm(dim=0), torch.ones(5), atol=1e-6)
    cos = m.t() @ m
    assert torch.allclose(cos[~torch.eye(5, dtype=torch.bool)], torch.full((20,), -1 / 4), atol=1e-6)


def test_simplex_etf_needs_enough_dimensions():
    from clients.fedetf import simplex_etf

    with pytest.raises(FedLTError, match="at least 5 dimensions"):
        simplex_etf(torch.rand(4, 5))


def test_etf_head_logits_and_temperature_gradient_match_official():
    """client_funct.py client_fedetf: feature = normalise(linear_proto(x)); z = scaling_train · feature @ proto."""
    from clients.fedetf import ETFProjectionHead

    torch.manual_seed(0)
    head = ETFProjectionHead(6, 4, 5, temperature=2.5)
    h = torch.randn(3, 6)
    y = torch.tensor([0, 3, 1])
    z = head(h)
    feature = head.projection(h)
    feature = torch.div(feature, torch.norm(feature, p=2, dim=1, keepdim=True).clamp(min=1e-12))
    official = head.temperature * torch.matmul(feature, head.proto)
    assert torch.allclose(z, official)
    (g_ours,) = torch.autograd.grad(F.cross_entropy(z, y), head.temperature)
    (g_official,) = torch.autograd.grad(F.cross_entropy(official, y), head.temperature)
    # dL/dT = mean_i Σ_c (softmax(z_i)_c − 1[c = y_i]) · (u_i·m_c)
    s = (feature @ head.proto).detach()
    by_hand = ((torch.softmax(2.5 * s, 1) - F.one_hot(y, 4)) * s).sum(1).mean()
    assert g_ours.item() == pytest.approx(g_official.item(), rel=1e-6)
    assert g_ours.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert "proto" not in head.state_dict()  # fixed, never sent


def official_balanced_softmax_loss(logits, labels, sample_per_class):
    """client_funct.py balanced_softmax_loss, counts floored as nodes.py generate_sample_per_class."""
    sample_per_class = torch.where(sample_per_class > 0, sample_per_class, 1)
    spc = sample_per_class.type_as(logits)
    spc = spc.unsqueeze(0).expand(logits.shape[0], -1)
    logits = logits + spc.log()
    return F.cross_entropy(input=logits, target=labels, reduction="mean")


def test_fedetf_balanced_loss_matches_official():
    from clients.fedetf import floored_log_counts
    from fedlt.losses import balanced_softmax_loss

    z = torch.tensor([[1.0, -0.5, 0.2, 0.0], [0.3, 0.3, -1.0, 2.0]])
    y = torch.tensor([1, 3])
    counts = torch.tensor([50, 5, 0, 1])
    ours = balanced_softmax_loss(z, y, floored_log_counts(counts))  # the client's objective's loss
    assert ours.item() == pytest.approx(official_balanced_softmax_loss(z, y, counts).item(), rel=1e-6)
    row0 = z[0] + torch.log(torch.tensor([50.0, 5.0, 1.0, 1.0]))
    row1 = z[1] + torch.log(torch.tensor([50.0, 5.0, 1.0, 1.0]))
    by_hand = -(torch.log_softmax(row0, 0)[1] + torch.log_softmax(row1, 0)[3]) / 2
    assert ours.item() == pytest.approx(by_hand.item(), rel=1e-6)


def _fedetf(*overrides: str):
    from clients.fedetf import FedETFClient

    cfg = load_config(None, ["strategy.name=fedetf", "mode=federated", "train.batch_size=8", "train.lr=0.05",
                             *overrides])
    torch.manual_seed(0)
    model = FedETFClient.adapt_model(small_cnn(4, in_channels=1, width=4), cfg, 4)
    return FedETFClient(cfg), model, cfg


def test_fedetf_projection_dim_refused_below_classes():
    from clients.fedetf import FedETFClient

    cfg = load_config(None, ["strategy.name=fedetf", "client.projection_dim=3"])
    with pytest.raises(FedLTError, match="client.projection_dim"):
        FedETFClient.adapt_model(small_cnn(4, in_channels=1, width=4), cfg, 4)


def test_fedetf_personalise_tunes_only_etf_and_projection():
    """Client_personalization: after the local epochs, alternately the ETF and the projection (CE) train;
    with finetune_epochs=0 the backbone and the temperature stay as received, and the global model is not
    touched."""
    client, model, _ = _fedetf("client.finetune_epochs=0", "client.personal_rounds=2", "client.personal_epochs=1")
    before = copy.deepcopy(model.state_dict())
    proto = model.classifier.proto.clone()
    data = _tiny_data()
    personal = client.personalise(model, data, {"partition-id": 0, "server-round": 3})
    for k, v in model.state_dict().items():  # the received model is unchanged
        assert torch.equal(v, before[k]), k
    assert torch.equal(model.classifier.proto, proto)
    after = personal.state_dict()
    assert not torch.equal(after["classifier.proto"], proto)  # the ETF was fine-tuned
    assert not torch.equal(after["classifier.projection.weight"], before["classifier.projection.weight"])
    assert torch.equal(after["classifier.temperature"], before["classifier.temperature"])
    for k, v in before.items():
        if k.startswith("features."):
            assert torch.equal(after[k], v), k


def test_fedetf_personalise_finetunes_everything_first():
    client, model, _ = _fedetf("client.finetune_epochs=1", "client.personal_rounds=0")
    before = copy.deepcopy(model.state_dict())
    personal = client.personalise(model, _tiny_data(), {"partition-id": 1})
    assert not torch.equal(personal.state_dict()["features.10.weight"], before["features.10.weight"])
    assert not torch.equal(personal.state_dict()["classifier.temperature"], before["classifier.temperature"])


# --------------------------------------------------------------------------- FedLoGe
def official_gen_sparse_etf(ori_M: torch.Tensor, zero_indices: np.ndarray, n_steps: int) -> torch.Tensor:
    """util/etf_methods.py ETF_Classifier.gen_sparse_ETF, with given zero indices and n_steps (official 10000)."""
    etf = copy.deepcopy(ori_M)
    etf_flatten = etf.flatten()
    etf_flatten[zero_indices] = 0
    sparse_etf = etf_flatten.reshape(ori_M.shape)
    sparse_etf = sparse_etf.clone().detach().requires_grad_(True)
    mask = (sparse_etf != 0).float()
    optimizer = torch.optim.Adam([sparse_etf], lr=0.0001)
    for step in range(n_steps):
        optimizer.zero_grad()
        row_norms = torch.norm(sparse_etf, p=2, dim=0)
        norm_loss = torch.sum((row_norms - 0.1) ** 2)
        normalized_etf = sparse_etf / row_norms
        cos_sim = torch.mm(normalized_etf.t(), normalized_etf)
        torch.diagonal(cos_sim).fill_(-1)
        angle_loss = -torch.acos(cos_sim.max(dim=1)[0].clamp(-0.99999, 0.99999)).mean()
        loss = norm_loss + angle_loss
        loss.backward()
        if sparse_etf.grad is not None:
            sparse_etf.grad *= mask
        optimizer.step()
    return sparse_etf.detach()


def test_sparse_etf_matches_official_optimisation():
    from clients.fedetf import simplex_etf
    from clients.fedloge import sparse_etf

    rng = np.random.default_rng(1)
    etf = simplex_etf(torch.from_numpy(rng.random((16, 5))))
    zero = rng.choice(16 * 5, int(0.6 * 16 * 5), replace=False)
    ours = sparse_etf(etf, zero, steps=300)
    official = official_gen_sparse_etf(etf, zero, 300)
    assert torch.allclose(ours, official, atol=1e-6)
    flat = ours.flatten()
    assert (flat[torch.as_tensor(zero)] == 0).all() and (flat != 0).sum() == 16 * 5 - 48  # sparsity β = 0.6
    assert not torch.allclose(ours.flatten()[flat != 0], etf.flatten()[flat != 0])  # the kept entries moved
    assert (ours.norm(dim=0) - 0.1).abs().max() < (etf.norm(dim=0) - 0.1).abs().max()  # towards norm 0.1


def test_gha_matches_official_realignment():
    """util/update_baseline.py globaltest_calibra: g_aux.weight * (1.7 / ‖row‖), bias kept."""
    from clients.fedloge import FedLoGeHead, gha_weight
    from strategies.fedloge import FedLoGe

    w = torch.tensor([[3.0, 4.0], [0.0, 0.5], [1.0, -1.0]])
    assert torch.allclose(gha_weight(w), w * (1.7 / torch.norm(w, dim=1)).view(-1, 1))
    assert torch.allclose(gha_weight(w)[0], torch.tensor([1.02, 1.36]))
    cfg = load_config(None, ["strategy.name=fedloge", "mode=federated"])
    features = nn.Identity()
    head = FedLoGeHead(2, 3, torch.zeros(2, 3))
    with torch.no_grad():
        head.aux.weight.copy_(w)
        head.aux.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model = SplitModel(features, head, 2)
    h = torch.tensor([[1.0, 2.0]])
    z = FedLoGe(cfg, 3).eval_model(model)(h)
    assert torch.allclose(z, h @ gha_weight(w).t() + torch.tensor([0.1, -0.2, 0.3]))
    for which, expected in (("aux", h @ w.t() + head.aux.bias), ("sse_c", head.sse_bias.expand(1, 3))):
        cfg_w = load_config(None, ["strategy.name=fedloge", f"strategy.global_head={which}"])
        assert torch.allclose(FedLoGe(cfg_w, 3).eval_model(model)(h), expected)


@pytest.mark.parametrize("form", ["realignment", "readme"])
def test_lha_matches_the_release(form):
    """``realignment`` (the default): realignment.py's ``update_weights_norm_init(..., epoch=0)``
    (util/update_baseline.py) sets g_aux.weight ← g_aux.weight·‖l_head rows‖, no training at epoch 0; ``readme``
    (step 2.1): the realigned local head takes that rescaled weight, its own bias. Then, as ``localtest``
    (p_mode 1), the weight rows of the absent classes are −1e10 on both heads and the logits l_head(h) + g_head(h)
    (here the classes the client has no training sample of)."""
    from clients.fedloge import lha_logits

    torch.manual_seed(0)
    g, l = nn.Linear(3, 4), nn.Linear(3, 4)
    h = torch.rand(5, 3) + 0.1  # ReLU features
    absent = torch.tensor([False, False, True, False])
    g_head, l_head = copy.deepcopy(g), copy.deepcopy(l)
    rescaled = nn.Parameter(g.weight * torch.norm(l.weight, p=2, dim=1).unsqueeze(1))
    if form == "realignment":
        g_head.weight = rescaled
    else:
        l_head.weight = rescaled
    for i in np.where(absent.numpy())[0]:
        g_head.weight.data[i, :] = -1e10
        l_head.weight.data[i, :] = -1e10
    official = l_head(h) + g_head(h)
    ours = lha_logits(h, g, l, absent, form)
    keep = ~absent
    assert torch.allclose(ours[:, keep], official[:, keep], atol=1e-6)
    assert torch.isinf(ours[:, 2]).all() and (official[:, 2] < -1e9).all()
    other = lha_logits(h, g, l, absent, "readme" if form == "realignment" else "realignment")
    assert not torch.allclose(ours[:, keep], other[:, keep], atol=1e-3)  # the two forms differ


def test_fedloge_loss_step_matches_official_three_optimisers():
    """update_weights_gaux: SGD(backbone) on CE(g_head(h)), SGD(g_aux) on CE(g_aux(h.detach())), SGD(l_head) on
    CE(l_head(h.detach())), same lr and momentum: two steps of one SGD on the client's objective give the same
    weights, and SSE-C stays fixed."""
    from clients.fedloge import FedLoGeHead, fedloge_objective

    torch.manual_seed(0)
    features = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
    ours = nn.Module()
    ours.features, ours.classifier = features, FedLoGeHead(8, 4, torch.randn(8, 4) * 0.1)
    ours.classifier.local = nn.Linear(8, 4)
    official = copy.deepcopy(ours)
    x, y = torch.randn(10, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0])
    lr, momentum = 0.03, 0.5
    opt = torch.optim.SGD([p for p in ours.parameters()], lr=lr, momentum=momentum)
    net, g_aux, l_head = official.features, official.classifier.aux, official.classifier.local
    sse_w, sse_b = official.classifier.sse_weight.clone(), official.classifier.sse_bias.clone()
    opt_b = torch.optim.SGD(list(net.parameters()), lr=lr, momentum=momentum)
    opt_g = torch.optim.SGD(g_aux.parameters(), lr=lr, momentum=momentum)
    opt_l = torch.optim.SGD(l_head.parameters(), lr=lr, momentum=momentum)
    for _ in range(2):
        opt.zero_grad()
        fedloge_objective(ours.classifier)(ours, x, y).backward()
        opt.step()
        opt_b.zero_grad(), opt_g.zero_grad(), opt_l.zero_grad()
        features_ = net(x)
        F.cross_entropy(F.linear(features_, sse_w, sse_b), y).backward()
        opt_b.step()
        F.cross_entropy(g_aux(features_.detach()), y).backward()
        opt_g.step()
        F.cross_entropy(l_head(features_.detach()), y).backward()
        opt_l.step()
    for (k, a), (_, b) in zip(ours.named_parameters(), official.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert torch.equal(ours.classifier.sse_weight, sse_w) and torch.equal(ours.classifier.sse_bias, sse_b)


def _fedloge_client(*overrides: str):
    from clients.fedloge import FedLoGeClient

    cfg = load_config(None, ["strategy.name=fedloge", "mode=federated", "train.batch_size=8", "train.lr=0.05",
                             "client.sse_steps=5", *overrides])
    torch.manual_seed(0)
    return FedLoGeClient(cfg), FedLoGeClient.adapt_model(small_cnn(4, in_channels=1, width=4), cfg, 4), cfg


def test_fedloge_fit_returns_local_head_and_uses_the_one_sent():
    from fedlt.train import Augment
    from strategies.fedloge import FedLoGe

    client, model, cfg = _fedloge_client()
    global_state = copy.deepcopy(model.state_dict())
    data = _tiny_data()
    sse = model.classifier.sse_weight.clone()
    result = client.fit(model, data, {"partition-id": 2}, torch.Generator().manual_seed(0), Augment(0, False))
    assert set(result.state) == set(global_state)  # no classifier.local.* in what is aggregated
    assert torch.equal(model.classifier.sse_weight, sse)
    head = result.extra_arrays["l-head"]
    assert head["weight"].shape == (4, 128) and head["bias"].shape == (4,)
    first = client.local_head(model, {"partition-id": 2})  # the seeded initial head, before any round
    assert not torch.equal(first.weight, head["weight"])  # it trained
    # the strategy sends it back in the client's next message
    strategy = FedLoGe(cfg, 4)
    strategy.local_heads[2] = (head["weight"], head["bias"])
    sent = strategy.train_config(5, 2)
    assert strategy.train_config(5, 1) == {}
    assert torch.equal(client.local_head(model, sent).weight, head["weight"])
    restored = FedLoGe(cfg, 4)
    restored.load_state_dict(strategy.state_dict())
    assert torch.equal(restored.local_heads[2][0], head["weight"])


def test_fedloge_personalise_is_lha_with_the_clients_head():
    from clients.fedloge import lha_logits

    client, model, _ = _fedloge_client()
    data = _tiny_data(labels=[0, 0, 1, 3, 3, 3])  # class 2 absent
    local = nn.Linear(128, 4)
    config = {"partition-id": 0, "l-head-weight": local.weight.detach().flatten().tolist(),
              "l-head-bias": local.bias.detach().tolist()}
    personal = client.personalise(model, data, config)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        z = personal(x)
        expected = lha_logits(model.features(x), model.classifier.aux, local, torch.tensor([0, 0, 1, 0]).bool())
    assert torch.isinf(z[:, 2]).all() and torch.isfinite(z[:, [0, 1, 3]]).all()
    assert torch.allclose(z[:, [0, 1, 3]], expected[:, [0, 1, 3]], atol=1e-5)


def test_fedloge_options_refused_at_config_time():
    with pytest.raises(FedLTError, match="client.sparsity"):
        load_config(None, ["strategy.name=fedloge", "client.sparsity=1.5"])
    with pytest.raises(FedLTError, match="strategy.global_head"):
        load_config(None, ["strategy.name=fedloge", "strategy.global_head=median"])


# --------------------------------------------------------------------------- tiny federated runs
@pytest.mark.parametrize("strategy", ["fedetf", "fedloge"])
def test_tiny_federated_run(strategy, tiny_lists, tmp_path):
    from test_federated_methods import simulate, tiny_config

    from fedlt.experiment import experiment_for, model_for

    cfg = tiny_config(tiny_lists, f"strategy.name={strategy}", *(["client.sse_steps=20"] if strategy == "fedloge" else []))
    # every process builds the same fixed head from the seed
    exp = experiment_for(cfg)
    a, b = model_for(cfg, exp), model_for(cfg, exp)
    buffers = ["proto"] if strategy == "fedetf" else ["sse_weight", "sse_bias"]
    for name in buffers:
        assert torch.equal(getattr(a.classifier, name), getattr(b.classifier, name))
    summary, rows = simulate(cfg, tmp_path / strategy)
    assert summary["client"] == strategy and len(rows) == 2
    assert all(math.isfinite(r["accuracy"]) and math.isfinite(r["train_loss"]) for r in rows)
    if strategy == "fedloge":  # the server kept the local head of every client that trained
        state = torch.load(tmp_path / strategy / "checkpoint.pt", weights_only=True)
        trained = {p for r in rows for p in r["clients"]}
        heads = state["state"]["strategy"]["local_heads"]
        assert {int(k) for k in heads} == trained
        assert all(w.shape == (10, 128) and torch.isfinite(w).all() for w, _ in heads.values())
        by_head = summary["fedloge_heads"]
        assert set(by_head) == {"gha", "sse_c", "aux"}
        assert by_head["gha"]["accuracy"] == pytest.approx(rows[-1]["accuracy"])  # the reported global head


@pytest.fixture(scope="module")
def tiny_lists(tmp_path_factory):
    from test_federated_methods import CIFAR_JPEG, write_tiny_lists

    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    return write_tiny_lists(tmp_path_factory.mktemp("tiny"))


def test_fedetf_fused_engine_matches_inprocess(tiny_lists, tmp_path, capsys):
    """The fused engine trains FedETF's clients as one stacked model (its fixed ETF, a non-persistent buffer, shared)
    with the same result as the in-process engine."""
    from test_federated_methods import tiny_config

    from fedlt.federation.fused import run_fused
    from fedlt.federation.inprocess import run_inprocess

    results = {}
    for name, engine in (("inprocess", run_inprocess), ("fused", run_fused)):
        cfg = tiny_config(tiny_lists, "strategy.name=fedetf", f"federation.engine={name}")
        s = engine(cfg, str(tmp_path / name))
        results[name] = (s["accuracy"], s["loss"])
    assert "fused training failed" not in capsys.readouterr().out
    assert results["fused"][0] == results["inprocess"][0]
    assert results["fused"][1] == pytest.approx(results["inprocess"][1], rel=1e-4)
