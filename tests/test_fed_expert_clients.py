"""The federated clients of TLC and SHIKE (clients/tlc.py, clients/shike.py): each local objective is the
centralized method's arithmetic (its objective, built on the client's class counts, on the same batch), and one
federated round runs in-process with finite metrics. The centralized losses themselves are tested against the
official code in test_tlc.py and test_shike.py."""

import math

import numpy as np
import pytest
import torch

from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.models.experts import resnet32_experts, small_cnn_experts
from fedlt.models.shike import small_cnn_shike
from fedlt.registry import CENTRALIZED
from fedlt.train import TensorData

LABELS = torch.tensor([0, 0, 0, 1, 3, 3])  # the client's counts (3, 1, 0, 2): class 2 absent, counted as 1
COUNTS = [3, 1, 1, 2]


def client_data() -> TensorData:
    return TensorData(torch.zeros(6, 1, 12, 12, dtype=torch.uint8), LABELS, torch.tensor([0.5]),
                      torch.tensor([0.25]), 4)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 12, 12, generator=g), torch.tensor([0, 1, 2, 3, 0, 0, 3, 1])


# --- TLC ---
def test_tlc_client_objective_is_the_centralized_tlc_loss_on_the_local_counts_and_round():
    from clients.tlc import TLCClient

    # R = round(0.4 · 5) = 2: rounds 1, 2 play epochs 0, 1 (no re-weighting), round 3 epoch 2 (re-weighted)
    cfg = load_config(None, ["client.name=tlc", "model.name=small_cnn_experts", "model.num_experts=2",
                             "federation.rounds=5", "client.drw_fraction=0.4", "client.annealing=3"])

    def central_tlc(drw_fraction: float):
        return CENTRALIZED.get("tlc")(
            load_config(None, ["mode=centralized", "centralized.method=tlc", "centralized.epochs=5",
                               f"centralized.drw_fraction={drw_fraction}", "centralized.annealing=3",
                               "centralized.num_experts=2"]), np.asarray(COUNTS))
    central = central_tlc(0.4)
    torch.manual_seed(0)
    model = small_cnn_experts(4, num_experts=2)
    x, y = batch()
    client = TLCClient(cfg)
    got = {}
    for r in (1, 2, 3):
        got[r] = client.objective(model, client_data(), {"server-round": r})(model, x, y)
        want = central.objective(r - 1)(model, x, y)
        assert got[r].item() == pytest.approx(want.item(), rel=1e-6), r
    assert got[1].item() != pytest.approx(got[2].item(), rel=1e-6)  # KL annealing r/T moves with the round
    # re-weighting from round R + 1 changes the loss beyond the annealing step
    unweighted = central_tlc(1.0)  # same annealing T needs the same R: compare the re-weighting alone by hand
    assert unweighted.reweight_epoch() == 5 and central.reweight_epoch() == 2
    from fedlt.losses import tlc_combine, tlc_loss
    z = model.expert_logits(x)
    output, w = tlc_combine(z)
    plain = tlc_loss(z, output, w, y, central.margins, 3, central.kl_period)
    assert got[3].item() != pytest.approx(plain.item(), rel=1e-4)


def test_tlc_client_on_resnet32_experts_builds_tlcs_layout():
    from clients.tlc import TLCClient

    cfg = load_config(None, ["client.name=tlc", "model.name=resnet32_experts", "model.num_experts=2"])
    model = TLCClient.adapt_model(resnet32_experts(10, 3, num_experts=2), cfg, 10)
    official = resnet32_experts(10, 3, num_experts=2, widths=(16, 32, 64), shared_layer1=False)
    assert [p.shape for p in model.parameters()] == [p.shape for p in official.parameters()]
    assert len(model.stem) == 3  # conv1, bn1, ReLU only: layer1 is each expert's own
    reduced = load_config(None, ["client.name=tlc", "model.name=resnet32_experts", "model.num_experts=2",
                                 "client.reduce_dimension=true"])
    small = TLCClient.adapt_model(resnet32_experts(10, 3, num_experts=2), reduced, 10)
    assert small.experts[0].feature_dim == 48 and model.experts[0].feature_dim == 64


def test_tlc_and_shike_clients_refuse_models_without_their_experts():
    with pytest.raises(FedLTError, match="client method tlc needs a multi-expert model"):
        load_config(None, ["client.name=tlc", "model.name=small_cnn"])
    with pytest.raises(FedLTError, match="set model.classifier=cosine"):
        load_config(None, ["client.name=tlc", "model.name=small_cnn_experts", "model.classifier=linear"])
    with pytest.raises(FedLTError, match="client method shike needs a depth-fused.*small_cnn_shike"):
        load_config(None, ["client.name=shike", "model.name=small_cnn_experts"])


# --- SHIKE ---
def test_shike_client_objective_is_the_centralized_stage1_dkt_loss():
    from clients.shike import SHIKEClient
    from fedlt.losses.shike import shike_loss

    cfg = load_config(None, ["client.name=shike", "model.name=small_cnn_shike", "model.num_experts=3",
                             "client.hns_weight=3"])
    central = CENTRALIZED.get("shike")(
        load_config(None, ["mode=centralized", "centralized.method=shike", "model.name=small_cnn_shike",
                           "centralized.hns_weight=3"]), np.asarray(COUNTS))
    torch.manual_seed(0)
    model = small_cnn_shike(4, num_experts=3, width=8)
    x, y = batch(1)
    got = SHIKEClient(cfg).objective(model, client_data(), {"server-round": 2})(model, x, y)
    assert got.item() == pytest.approx(central.objective(0)(model, x, y).item(), rel=1e-6)
    assert got.item() == pytest.approx(shike_loss(model.expert_logits(x), y, 3.0).item(), rel=1e-6)
    assert got.item() != pytest.approx(shike_loss(model.expert_logits(x), y, 10.0).item(), rel=1e-4)


# --- one federated round each ---
@pytest.mark.parametrize("client,model", [("tlc", "small_cnn_experts"), ("shike", "small_cnn_shike")])
def test_expert_client_one_federated_round(tmp_path, client, model):
    from test_federated_methods import CIFAR_JPEG, simulate, tiny_config, write_tiny_lists

    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    cfg = tiny_config(write_tiny_lists(tmp_path / "tiny"), f"client.name={client}", f"model.name={model}",
                      "federation.rounds=1")
    summary, rows = simulate(cfg, tmp_path / "run")
    assert summary["client"] == client and len(rows) == 1
    assert math.isfinite(summary["accuracy"]) and math.isfinite(summary["loss"])
    assert math.isfinite(rows[0]["train_loss"])


# --------------------------------------------------------------------------- TDE client
def test_tde_client_builds_the_centralized_causal_norm_head():
    from fedlt.centralized.tde import CausalNormClassifier
    from fedlt.experiment import experiment_for, model_for

    fed = load_config(None, ["mode=federated", "client.name=tde", "client.alpha=2", "seed=3"])
    exp = experiment_for(fed)
    model = model_for(fed, exp)
    assert isinstance(model.classifier, CausalNormClassifier) and model.classifier.alpha == 2
    central = CENTRALIZED.get("tde")(load_config(None, ["mode=centralized", "centralized.method=tde",
                                                        "centralized.alpha=2", "seed=3"]), exp.train_counts)
    reference = central.build_model(exp)
    for k, v in reference.state_dict().items():  # the same seeded weights as centralized.method=tde
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(FedLTError, match="client method tde replaces one classifier"):
        load_config(None, ["mode=federated", "client.name=tde", "model.name=small_cnn_experts"])


def test_tde_client_round_averages_the_moving_feature_and_evaluates_with_the_effect_removed(tmp_path):
    from test_federated_methods import CIFAR_JPEG, simulate, tiny_config, write_tiny_lists

    from fedlt.experiment import experiment_for, model_for

    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    cfg = tiny_config(write_tiny_lists(tmp_path / "tiny"), "client.name=tde", "federation.rounds=1")
    summary, rows = simulate(cfg, tmp_path / "run")
    assert summary["client"] == "tde" and len(rows) == 1 and math.isfinite(summary["accuracy"])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]["model"]
    assert state["classifier.embed"].abs().sum() > 0  # the clients' moving averages came back and were averaged
    model = model_for(cfg, experiment_for(cfg))
    model.load_state_dict(state)
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    with_effect = model(x)
    model.classifier.use_effect = False
    assert not torch.allclose(with_effect, model(x))  # the server's evaluation removes the ē direction
