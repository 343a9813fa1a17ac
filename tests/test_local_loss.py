"""The ``local_loss`` client trains with every registered loss of the zoo (one signature), on its local counts."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.registry import CLIENTS, LOSSES
from fedlt.train import TensorData

LOCAL_COUNTS = [6, 3, 1, 0]  # a client without class 3


def local_data() -> TensorData:
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(LOCAL_COUNTS)])
    images = torch.randint(0, 256, (len(labels), 1, 4, 4), generator=g, dtype=torch.uint8)
    return TensorData(images, labels, torch.tensor([0.5]), torch.tensor([0.25]), len(LOCAL_COUNTS))


def local_cfg(loss: str, *extra: str):
    return load_config(None, ["client.name=local_loss", f"client.loss={loss}", "train.local_steps=1",
                              "train.batch_size=8", "train.lr=0.1", "device=cpu", *extra])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_one_local_step_of_every_registered_loss(loss):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, len(LOCAL_COUNTS)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = CLIENTS.get("local_loss")(local_cfg(loss))
    result = method.fit(model, local_data(), {}, torch.Generator().manual_seed(0), None)
    assert result.metrics["steps"] == 1
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] > 0
    assert all(torch.isfinite(v).all() for v in result.state.values())
    assert not torch.equal(result.state["1.weight"], before["1.weight"])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_factory_keywords_are_its_options(loss):
    """Each factory's keywords (after class_counts) are its Options' fields, with the same defaults."""
    params = list(inspect.signature(LOSSES.get(loss)).parameters.values())
    assert params[0].name == "class_counts"
    fields = LOSSES.options(loss).model_fields
    assert {p.name: p.default for p in params[1:]} == {k: f.default for k, f in fields.items()}


def test_local_prior_and_options_reach_the_loss():
    data = local_data()  # π = (0.6, 0.3, 0.1, 0) -> log π_3 = log 1e-12
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    log_pi = torch.log(torch.tensor([0.6, 0.3, 0.1, 0.0]) + 1e-12)
    obj = CLIENTS.get("local_loss")(local_cfg("la", "client.loss_options={tau: 0.5}")).objective(model, data, {})
    expected = F.cross_entropy(model(x) + 0.5 * log_pi, y)
    assert obj(model, x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    obj = CLIENTS.get("local_loss")(local_cfg("focal", "client.loss_options={gamma: 0}")).objective(model, data, {})
    assert obj(model, x, y).item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["client.loss=mixup"], "config key 'client.loss' must be a registered loss (bal_bce, balanced_softmax, cb, "
                            "ce, eql, focal, la, label_aware_smoothing, ldam, reweight, seql), got 'mixup'"),
    (["client.loss=posthoc_la"], "config key 'client.loss' must be a registered loss ("),
    (["client.loss=focal", "client.loss_options={tau: 1}"],
     "config key 'client.loss_options' has no key 'tau' for loss 'focal' (it takes gamma)"),
    (["client.loss=cb", "client.loss_options={beta: 1}"], "config key 'client.loss_options.beta' must be < 1, got 1"),
])
def test_bad_loss_or_option_is_one_line(extra, message):
    with pytest.raises(FedLTError) as err:
        load_config(None, ["client.name=local_loss", *extra])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
