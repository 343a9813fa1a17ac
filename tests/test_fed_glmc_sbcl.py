"""The federated client of GLMC (clients/glmc.py): its local objective is the centralized method's step
(:class:`fedlt.centralized.glmc.GLMC`, built on the client's class counts, the round as the epoch, the same
random draws) on the same batch, its model is GLMC's, and one federated round runs in-process with finite
metrics. GLMC's loss itself is tested against the official arithmetic in test_zoo_contrast.py."""

import math

import numpy as np
import pytest
import torch

from fedlt.centralized.glmc import GLMCModel, TwoCrops
from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.experiment import augment_for
from fedlt.models.cnn import small_cnn
from fedlt.models.resnet_cifar import resnet32
from fedlt.registry import CENTRALIZED
from fedlt.train import TensorData

LABELS = torch.tensor([0, 0, 0, 1, 3, 3])  # the client's counts (3, 1, 0, 2): class 2 absent


def client_data() -> TensorData:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 1, 12, 12), generator=g, dtype=torch.uint8)
    return TensorData(images, LABELS, torch.tensor([0.5]), torch.tensor([0.25]), 4)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views (2B = 8 rows) of B = 4 images, as the client's TwoCrops batches."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 12, 12, generator=g), torch.tensor([0, 1, 3, 0])


GLMC_KEYS = ["label_weighting=1.5", "resample_weighting=0.5", "contrast_weight=2", "projection_dim=16"]


def glmc_client_cfg():
    return load_config(None, ["client.name=glmc", "model.name=small_cnn", "federation.rounds=5"]
                       + [f"client.{k}" for k in GLMC_KEYS])


def central_glmc(counts, cfg, data, generator, rng):
    """centralized.method=glmc on ``counts`` over 5 epochs, its draws from the client's generators."""
    central = CENTRALIZED.get("glmc")(
        load_config(None, ["mode=centralized", "centralized.method=glmc", "centralized.epochs=5"]
                    + [f"centralized.{k}" for k in GLMC_KEYS]), np.asarray(counts))
    central.data, central.views = data, TwoCrops(augment_for(cfg, data))
    central.generator, central.rng = generator, rng
    return central


def test_glmc_client_objective_is_the_centralized_glmc_step_on_the_local_counts_and_round():
    from clients.glmc import GLMCClient

    cfg = glmc_client_cfg()
    client, data = GLMCClient(cfg), client_data()
    torch.manual_seed(0)
    model = GLMCClient.adapt_model(small_cnn(4, 1, width=8), cfg, 4)
    x, y = batch()
    got = {}
    for r in (1, 4):
        config = {"server-round": r, "partition-id": 2}
        got[r] = client.objective(model, data, config)(model, x, y)
        central = central_glmc([3, 1, 0, 2], cfg, data, *client.streams(config))
        want = central.objective(r - 1)(model, x, y)
        assert torch.isfinite(got[r])
        assert got[r].item() == pytest.approx(want.item(), rel=1e-6), r
    # the client's counts matter: other counts (here 0 and 1 swapped) re-weight the labels of round 4 otherwise
    config = {"server-round": 4, "partition-id": 2}
    other = central_glmc([1, 3, 0, 2], cfg, data, *client.streams(config)).objective(3)(model, x, y)
    assert got[4].item() != pytest.approx(other.item(), rel=1e-4)
    assert client.round_alpha({"server-round": 1}) == 1.0
    assert client.round_alpha({"server-round": 4}) == pytest.approx(1 - (3 / 5) ** 2)
    # the draws are the client's round's own: another client of the same round draws another batch and λ
    other_client = client.objective(model, data, {"server-round": 4, "partition-id": 3})(model, x, y)
    assert other_client.item() != pytest.approx(got[4].item(), rel=1e-4)


def test_glmc_client_model_is_glmcs_and_the_server_tests_the_rebalanced_head():
    from clients.glmc import GLMCClient

    cfg = load_config(None, ["client.name=glmc", "model.name=resnet32", "client.projection_dim=32"])
    torch.manual_seed(0)
    model = GLMCClient.adapt_model(resnet32(10, 3), cfg, 10)
    assert isinstance(model, GLMCModel) and model.feature_dim == 256  # ResNet_modify's 64/128/256
    assert model.projection_head.out_features == 32 and model.fc.out_features == 10
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    fc, fc_cb, _, _ = model.heads(x)
    assert torch.equal(model(x), fc_cb) and not torch.allclose(fc, fc_cb)
    with pytest.raises(FedLTError, match="client method glmc adds its heads to a single-head model"):
        load_config(None, ["client.name=glmc", "model.name=small_cnn_experts"])


def test_glmc_client_one_federated_round(tmp_path):
    from test_federated_methods import CIFAR_JPEG, simulate, tiny_config, write_tiny_lists

    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    cfg = tiny_config(write_tiny_lists(tmp_path / "tiny"), "client.name=glmc", "federation.rounds=1",
                      "client.projection_dim=16")
    summary, rows = simulate(cfg, tmp_path / "run")
    assert summary["client"] == "glmc" and len(rows) == 1
    assert math.isfinite(summary["accuracy"]) and math.isfinite(summary["loss"])
    assert math.isfinite(rows[0]["train_loss"])


# --- SBCL ---
SBCL_COUNTS = [12, 4, 6, 3]  # with client.cluster=2: K = (4, 1, 2, 1) subclasses
SBCL_KEYS = ["cluster=2", "feat_dim=16", "gamma=0.5"]


def sbcl_data() -> TensorData:
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(SBCL_COUNTS)])
    return TensorData(torch.randint(0, 256, (len(labels), 1, 12, 12), generator=g, dtype=torch.uint8), labels,
                      torch.tensor([0.5]), torch.tensor([0.25]), 4)


def test_sbcl_client_clusters_and_loss_are_the_centralized_sbcl_on_the_local_data():
    from clients.sbcl import SBCLClient, cluster_client
    from fedlt.losses.ldam import make_ldam_loss

    cfg = load_config(None, ["client.name=sbcl", "model.name=small_cnn", "federation.rounds=5",
                             "client.supcon_fraction=0.2"] + [f"client.{k}" for k in SBCL_KEYS])
    client, data = SBCLClient(cfg), sbcl_data()
    torch.manual_seed(0)
    model = SBCLClient.adapt_model(small_cnn(4, 1, width=8), cfg, 4)
    central = CENTRALIZED.get("sbcl")(
        load_config(None, ["mode=centralized", "centralized.method=sbcl", "centralized.supcon_epochs=1"]
                    + [f"centralized.{k}" for k in SBCL_KEYS]), np.asarray(SBCL_COUNTS))
    config = {"server-round": 2, "partition-id": 1}
    central.data, central.views = data, TwoCrops(augment_for(cfg, data))
    central.generator, central.rng = client.streams(config)
    central.cluster(model)
    groups = client.subclasses(model, data, config, augment_for(cfg, data))
    assert torch.equal(groups.of_sample, central.subclasses) and torch.equal(groups.class_tau, central.class_tau)
    assert groups.classes.tolist() == [0, 0, 0, 0, 1, 2, 2, 3] and len(set(groups.of_sample[:12].tolist())) == 4

    idx = torch.tensor([0, 5, 11, 12, 16, 20, 22, 3])
    y = data.labels[idx]
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    b = len(y)
    ldam = make_ldam_loss(torch.tensor(SBCL_COUNTS), 0.5, 30.0, 0.9999)
    classifier_term = ldam(model.classifier(model.features(x[:b])) / 30.0, y)
    got = client.round_objective(data, groups)(model, x, groups.of_sample[idx])
    central.recorder.order = idx
    want = central.objective(2)(model, x, y)  # epoch 2: subclass loss, no clustering due
    assert got.item() == pytest.approx(want.item() + classifier_term.item(), rel=1e-5)
    # round 1 is the SupCon warm-up (W = round(0.2 · 5) = 1): no clustering, class labels
    assert client.warm({"server-round": 1}) and not client.warm({"server-round": 2})
    assert client.subclasses(model, data, {"server-round": 1}, augment_for(cfg, data)) is None
    warm = client.round_objective(data, None)(model, x, y)
    assert warm.item() == pytest.approx(central.objective(0)(model, x, y).item() + classifier_term.item(), rel=1e-5)
    # a client lacking class 1 clusters the classes it holds; class 1 keeps τ = T and has no subclass
    local = data.subset(torch.nonzero(data.labels != 1).squeeze(1))
    lacking = cluster_client(model, local, augment_for(cfg, local), 2, 0.1, 35, *client.streams(config))
    assert 1 not in lacking.classes.tolist() and lacking.class_tau[1].item() == pytest.approx(0.1)
    assert int(lacking.of_sample.max()) + 1 == len(lacking.classes)


def test_sbcl_client_one_federated_round(tmp_path):
    from test_federated_methods import CIFAR_JPEG, simulate, tiny_config, write_tiny_lists

    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    cfg = tiny_config(write_tiny_lists(tmp_path / "tiny"), "client.name=sbcl", "federation.rounds=1",
                      "client.feat_dim=16", "client.cluster=2")
    summary, rows = simulate(cfg, tmp_path / "run")
    assert summary["client"] == "sbcl" and len(rows) == 1
    assert math.isfinite(summary["accuracy"]) and math.isfinite(summary["loss"])
    assert math.isfinite(rows[0]["train_loss"])
