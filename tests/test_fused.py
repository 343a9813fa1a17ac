"""The fused engine (fedlt/federation/fused.py) against the per-client engines: the fused trainer against
``ClientMethod``'s own loop (fedlt.train.train with torch.optim.SGD) on clients of uneven sizes — weights,
BatchNorm buffers and momentum — and whole federated runs of both engines on the same config and seed."""

from __future__ import annotations

import copy
import json
from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import Message

from conftest import needs_fashion
from fedlt.config import load_config
from fedlt.experiment import augment_for
from fedlt.federation import fused as fused_module
from fedlt.federation.fused import (
    NotFusable,
    client_draws,
    cross_entropy_per_client,
    fused_train,
    group_batch,
    run_fused,
)
from fedlt.federation.inprocess import run_inprocess
from fedlt.models import build_model
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, torch_generator
from fedlt.train import (
    OptimConfig,
    TensorData,
    batch_schedule,
    cross_entropy_objective,
    instance_balanced_sampler,
    make_optimizer,
    train,
)

# client sizes at batch 16: 3 steps (last batch 5), 4 full steps, 6 steps (last 10), 3 steps (the batch of
# ONE sample is dropped, the 3rd step comes from a 2nd epoch) -> the fused steps mix group sizes and clients that finish early
SIZES = (37, 64, 90, 33)
METHODS = {  # name -> (client method, model, the server's config for the round)
    "fedavg": ("fedavg", "small_cnn", {}),
    "fedprox": ("fedprox", "small_cnn", {"proximal-mu": 0.5}),
    "fedlc": ("fedlc", "small_cnn", {"fedlc-tau": 1.0}),
    "local_loss": ("local_loss", "small_cnn", {}),
    "gbme_joint": ("gbme", "small_cnn_experts", {"expert": -1}),
    "gbme_expert": ("gbme", "small_cnn_experts", {"expert": 1}),
    "fedetf": ("fedetf", "small_cnn", {}),  # a 0-d parameter (the ETF head's temperature)
    "fedloge": ("fedloge", "small_cnn", {}),  # per-client local heads on the features (attach_local)
    "fedrod": ("fedrod", "small_cnn", {}),  # per-client personal heads beside the model (attach_local)
    "ncl": ("ncl", "small_cnn_experts", {}),  # NIL + NBOD over the experts' logits (hard categories: a sort)
    "shike": ("shike", "small_cnn_shike", {}),  # DKT: the experts' mutual KLs and the hardest negative
    "tlc": ("tlc", "small_cnn_experts", {"server-round": 1}),  # evidential combination, LDAM margins, Dirichlet KL
    "tlc_reweighted": ("tlc", "small_cnn_experts", {"server-round": 2}),  # + class weights and temperatures
    "tde": ("tde", "small_cnn", {}),  # the causal-norm head's moving-average feature ē: a buffer updated in forward
    "area": ("area", "small_cnn", {"server-round": 1}),  # class weights from a feature pass before training (prepare)
    # the balancer's state steps on the host every batch; its release draws from a seed drawn in prepare
    "fedgrab": ("fedgrab", "small_cnn", {"sgb-open": [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]}),
}
GROUP_LOSS = [k for k in METHODS if k != "fedgrab"]  # fedgrab's objective runs per client on its view
# fedloge: SSE-C's Adam steps 10, not 10,000 (its fit is not tested here); tlc: re-weighting from round 2 (R = 1)
EXTRA_KEYS = {"fedloge": ["client.sse_steps=10"],
              **{k: ["federation.rounds=2", "client.drw_fraction=0.5"] for k in ("tlc", "tlc_reweighted")}}


def synthetic_clients(seed: int = 0) -> list[TensorData]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in SIZES:
        images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 6, (n,), generator=g)  # classes 6..9 absent: FedLC's floor, local priors
        out.append(TensorData(images, labels, torch.tensor([0.3]), torch.tensor([0.35]), 10))
    return out


def per_client_and_fused(method_key: str, dtype: torch.dtype, nesterov: bool = False, per_client: bool = False):
    """Both trainers on the same 4 clients (each from its own perturbed start), each client's method called as
    ``fit`` and the fused engine call it (prepare on the client's generator, attach_local, objective); returns
    their states, momentum buffers, losses and round_metrics, per client. ``per_client``: the fused trainer
    calls each client's objective on its own slice of the group's forward pass (the path of an objective
    without structure)."""
    name, model_name, server = METHODS[method_key]
    strategy = CLIENTS.get(name).strategy or "fedavg"  # a client method that needs its strategy (gbme)
    cfg = load_config(None, [f"client.name={name}", f"strategy.name={strategy}", f"model.name={model_name}",
                             "train.batch_size=16", "train.weight_decay=0.01", f"train.nesterov={nesterov}",
                             *EXTRA_KEYS.get(method_key, [])])
    method = CLIENTS.get(name)(cfg)
    torch.manual_seed(0)
    template = build_model(model_name, 10, 1, norm="batch", width=4)  # small: fast on a CPU
    template = type(method).adapt_model(template, cfg, 10).to(dtype)
    datas = synthetic_clients()
    starts = []
    for j in range(len(datas)):
        m = copy.deepcopy(template)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * j * torch.randn_like(p))
        starts.append({k: v.clone() for k, v in m.state_dict().items()})
    config = {"lr": 0.05, **server, "log-prior": [-2.3 + 0.1 * c for c in range(10)]}
    augment = augment_for(cfg, datas[0])

    def cast(objective):  # the data are float32 images; a float64 model needs float64 inputs
        return lambda m, x, y: objective(m, x.to(dtype), y)

    configs = [{**config, "partition-id": j} for j in range(len(datas))]
    ref_states, ref_momentum, ref_losses, ref_metrics = [], [], [], []
    for j, data in enumerate(datas):
        m = copy.deepcopy(template)
        m.load_state_dict(starts[j])
        generator = torch_generator(0, Stream.CLIENT, 1, j)
        method.prepare(m, data, configs[j], generator, augment)
        method.attach_local(m, data, configs[j])
        built = method.objective(m, data, configs[j])
        opt = method.optim(config)
        optimizer = make_optimizer(m, opt)
        result = train(m, data, cast(built), opt=opt, epochs=1.0, generator=generator,
                       augment=augment, sampler=instance_balanced_sampler, optimizer=optimizer)
        ref_metrics.append(method.round_metrics(built))
        ref_states.append(m.state_dict())
        names = {id(p): n for n, p in m.named_parameters()}
        ref_momentum.append({names[id(p)]: s["momentum_buffer"] for p, s in optimizer.state.items()})
        ref_losses.append(result.loss)

    model = copy.deepcopy(template)
    objectives, opts, fused_starts, built = [], [], [], []
    generators = [torch_generator(0, Stream.CLIENT, 1, j) for j in range(len(datas))]
    for j, data in enumerate(datas):
        method.detach_local(model, {})  # as fused_replies: the last client's own modules stay on the template
        model.load_state_dict(starts[j])
        method.prepare(model, data, configs[j], generators[j], augment)
        method.attach_local(model, data, configs[j])
        fused_starts.append({k: v.clone() for k, v in model.state_dict().items()})
        objective = method.objective(model, data, configs[j])
        # as the method built it (the fused trainer casts the batch): a group's losses in one call where they
        # share a structure (fedlt.objectives); ``per_client`` wraps them so that each is called on its own
        objectives.append(cast(objective) if per_client else objective)
        built.append(objective)
        opts.append(method.optim(config))
    fused = fused_train(model, fused_starts, datas, objectives, opts, generators, augment, epochs=1.0, steps=None)
    fused_metrics = [method.round_metrics(o) for o in built]
    return (ref_states, ref_momentum, ref_losses, ref_metrics), fused, fused_starts, fused_metrics


@pytest.mark.parametrize("per_client", [False, True], ids=["group-loss", "per-client-loss"])
@pytest.mark.parametrize("method_key", list(METHODS))
def test_fused_trainer_matches_per_client_sgd_in_float64(method_key, per_client):
    (states, momentum, losses, metrics), fused, starts, fused_metrics = per_client_and_fused(
        method_key, torch.float64, nesterov=method_key == "fedprox", per_client=per_client)
    assert fused.steps == [3, 4, 6, 2]  # 33 at batch 16: 16 + 16, the last batch of one dropped
    for j in range(len(SIZES)):
        assert fused.states[j].keys() == states[j].keys()
        moved = 0
        for k, v in states[j].items():
            assert torch.allclose(fused.states[j][k], v, rtol=1e-9, atol=1e-9), (j, k)
            moved += not torch.equal(v, starts[j][k])
        assert moved > 0
        assert fused.momentum[j].keys() == momentum[j].keys() and momentum[j]
        for k, v in momentum[j].items():
            assert torch.allclose(fused.momentum[j][k], v, rtol=1e-9, atol=1e-9), (j, k)
        assert fused.losses[j] == pytest.approx(losses[j], rel=1e-6)
        assert fused_metrics[j].keys() == metrics[j].keys()  # fedgrab's balancer state, stepped each batch
        for k, v in metrics[j].items():
            np.testing.assert_allclose(fused_metrics[j][k], v, rtol=1e-9, atol=1e-12, err_msg=f"{j} {k}")
    if method_key == "fedgrab":
        assert all(any(v != 0 for v in m["sgb-pos"]) for m in metrics)
    if method_key == "gbme_expert":  # experts 0 and 2 are frozen: neither trained nor given momentum, but run
        frozen = [k for k in states[0] if k.startswith(("experts.0.", "experts.2."))]  # (their BatchNorm follows)
        weights = [k for k in frozen if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert weights and all(torch.equal(fused.states[0][k], starts[0][k]) for k in weights)
        assert all(not torch.equal(fused.states[0][k], starts[0][k]) for k in frozen if k.endswith("running_mean"))
        assert not any(k.startswith(("experts.0.", "experts.2.")) for k in fused.momentum[0])


def test_plain_cross_entropy_is_one_call_per_group_step(monkeypatch):
    """FedAvg's objective is computed for the whole group in one call (cross_entropy_per_client), with the
    per-client results of the float64 test above; it equals each client's cross_entropy_objective."""
    calls = []

    def counted(logits, y):
        calls.append(y.shape)
        return cross_entropy_per_client(logits, y)

    monkeypatch.setattr(fused_module, "cross_entropy_per_client", counted)
    (states, _, losses, _), fused, _, _ = per_client_and_fused("fedavg", torch.float64)
    # every group step of one epoch (3, 4, 6 and 2 steps): 6 steps, the third in two groups (5 and 16 images)
    assert len(calls) == 7 and calls[:3] == [(4, 16), (4, 16), (1, 5)]
    assert all(torch.allclose(fused.states[j][k], v, rtol=1e-9, atol=1e-9) for j in range(4)
               for k, v in states[j].items())
    assert fused.losses == pytest.approx(losses, rel=1e-9)
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(3, 5, 7, generator=g, dtype=torch.bfloat16), torch.randint(0, 7, (3, 5), generator=g)
    per = cross_entropy_per_client(logits, y)
    assert per.dtype == torch.float32 and torch.allclose(
        per, torch.stack([cross_entropy_objective(lambda x: x, logits[i], y[i]) for i in range(3)]), atol=1e-6)


@pytest.mark.parametrize("method_key", GROUP_LOSS)
def test_every_methods_objective_is_one_call_per_group_step(method_key, monkeypatch):
    """The methods' objectives have a structure (fedlt.objectives) the fused trainer computes for the whole
    group at once: every one of the 7 group steps (see above) gets its losses from _GroupLoss, none per client.
    (FedLoGe's: its three heads' weights are the group's rows of the stacked parameters.)"""
    answered, built = [], []
    call, of = fused_module._GroupLoss.__call__, fused_module._GroupLoss.of.__func__

    def counted(self, *args):
        losses = call(self, *args)
        answered.append(losses is not None)
        return losses

    def record(cls, *args):
        built.append(of(cls, *args))
        return built[-1]

    monkeypatch.setattr(fused_module._GroupLoss, "__call__", counted)
    monkeypatch.setattr(fused_module._GroupLoss, "of", classmethod(record))
    per_client_and_fused(method_key, torch.float64)
    assert answered == [True] * 7 and built[0].failed is None
    assert (built[0].function is None) == (method_key in ("fedavg", "fedprox", "tde"))  # cross-entropy: one kernel
    assert (built[0].mu != 0) == (method_key == "fedprox")


def branchy_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A loss vmap cannot run (data-dependent control flow)."""
    loss = torch.nn.functional.cross_entropy(logits, y, weight=weights)
    return loss * 2 if bool(weights.sum() > 4) else loss


def test_a_loss_vmap_cannot_run_is_computed_per_client(monkeypatch, capsys):
    """A LossObjective whose function vmap cannot batch falls back to the per-client path on the first step,
    with the same result as the per-client path from the start, and says so once."""
    datas = synthetic_clients()
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, norm="batch", width=4).to(torch.float64)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    weights = [torch.linspace(0.1, 1.0 + j, 10, dtype=torch.float64) for j in range(len(datas))]
    opt = OptimConfig(lr=0.05, momentum=0.9, weight_decay=0.01, batch_size=16)
    built = []
    of = fused_module._GroupLoss.of.__func__
    monkeypatch.setattr(fused_module._GroupLoss, "of", classmethod(lambda cls, *a: built.append(of(cls, *a))
                                                                    or built[-1]))

    def run(objectives):
        return fused_train(model, [start] * len(datas), datas, objectives, [opt] * len(datas),
                           [torch_generator(0, Stream.CLIENT, 1, j) for j in range(len(datas))], None,
                           epochs=1.0, steps=None)

    monkeypatch.setattr(fused_module._GroupLoss, "noted", set())
    structured = run([LossObjective(partial(branchy_loss, weights=w)) for w in weights])
    assert built[0] is not None and built[0].failed.startswith("RuntimeError")
    run([LossObjective(partial(branchy_loss, weights=w)) for w in weights])  # again: no second note
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note: fused engine")]
    assert notes == ["note: fused engine: loss branchy_loss runs once per client (vmap cannot batch it: "
                     "RuntimeError); the same result, more kernel launches"]
    plain = run([(lambda w: lambda m, x, y: branchy_loss(m(x), y, w))(w) for w in weights])
    assert built[2] is None  # the plain functions: no structure
    for a, b in zip(structured.states, plain.states):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert structured.losses == plain.losses


def test_fused_trainer_matches_per_client_sgd_in_float32():
    (states, momentum, _, _), fused, _, _ = per_client_and_fused("fedavg", torch.float32)
    for j in range(len(SIZES)):
        for k, v in states[j].items():
            assert torch.allclose(fused.states[j][k].float(), v.float(), rtol=1e-3, atol=1e-4), (j, k)
        for k, v in momentum[j].items():
            assert torch.allclose(fused.momentum[j][k], v, rtol=1e-3, atol=1e-3), (j, k)


def test_fused_trainer_flags_a_diverged_client_and_refuses_sharpness_aware_sgd():
    datas = synthetic_clients()[:2]
    model = build_model("small_cnn", 10, 1, norm="batch", width=4)
    states = [{k: v.clone() for k, v in model.state_dict().items()} for _ in datas]
    ce = torch.nn.functional.cross_entropy
    objectives = [lambda m, x, y: ce(m(x), y), lambda m, x, y: ce(m(x), y) * float("inf")]  # client 1 diverges
    opts = [OptimConfig(lr=0.05, batch_size=16)] * 2
    gens = [torch_generator(0, Stream.CLIENT, 1, j) for j in range(2)]
    result = fused_train(model, states, datas, objectives, opts, gens, None, epochs=None, steps=2)
    assert result.finite == [True, False] and np.isfinite(result.losses[0]) and not np.isfinite(result.losses[1])
    with pytest.raises(NotFusable, match="sharpness-aware"):
        fused_train(model, states, datas, objectives, [OptimConfig(lr=0.05, batch_size=16, sam="cc_sam")] * 2,
                    gens, None, epochs=None, steps=2)


def objective_mixup(m, x, y):  # a forward of a changed batch
    perm = torch.arange(len(y) - 1, -1, -1)
    return torch.nn.functional.cross_entropy(m(0.5 * x + 0.5 * x[perm]), y)


def objective_two_passes(m, x, y):  # two forwards in one step: BatchNorm's statistics move twice
    return torch.nn.functional.cross_entropy(m(x), y) + torch.nn.functional.cross_entropy(m(x), y)


def objective_features_of_a_changed_batch(m, x, y):  # BatchNorm in features: its statistics train per client
    return torch.nn.functional.cross_entropy(m.classifier(m.features(x + 0.1)), y)


def objective_reads_a_trained_buffer(m, x, y):  # a BatchNorm buffer of this client: not offered
    return torch.nn.functional.cross_entropy(m(x), y) + 0 * getattr(m.features, "1").running_mean.sum()


@pytest.mark.parametrize("objective", [objective_mixup, objective_two_passes, objective_features_of_a_changed_batch,
                                       objective_reads_a_trained_buffer])
def test_an_objective_the_group_forward_cannot_answer_is_not_fused(objective):
    """The group's forward is of each client's own batch, once a step: anything else must not be answered from it
    (it would train on the unchanged batch / update BatchNorm once) but go to the ClientApp."""
    datas = synthetic_clients()[:2]
    model = build_model("small_cnn", 10, 1, norm="batch", width=4)
    states = [{k: v.clone() for k, v in model.state_dict().items()} for _ in datas]
    with pytest.raises(NotFusable):
        fused_train(model, states, datas, [objective] * 2, [OptimConfig(lr=0.05, batch_size=16)] * 2,
                    [torch_generator(0, Stream.CLIENT, 1, j) for j in range(2)], None, epochs=None, steps=1)


def test_submodules_of_a_client_view_are_its_own_slices():
    """model.features on the client's own batch is the group's pass, a head on the features runs on the client's
    own slices of the head's parameters, and its parameters are the client's: as the per-client model."""
    datas = synthetic_clients()[:2]
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, norm="batch", width=4).to(torch.float64)
    states = []
    for j in range(2):
        with torch.no_grad():
            model.classifier.weight.add_(0.1 * j)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    seen = []

    def objective(m, x, y):
        logits = m.classifier(m.features(x))
        seen.append((logits.detach().clone(), m.classifier.weight.detach().clone(), x.detach().clone()))
        return torch.nn.functional.cross_entropy(logits, y)

    fused_train(model, states, datas, [objective] * 2, [OptimConfig(lr=0.05, batch_size=16)] * 2,
                [torch_generator(0, Stream.CLIENT, 1, j) for j in range(2)], None, epochs=None, steps=1)
    for j, (logits, weight, x) in enumerate(seen):
        own = copy.deepcopy(model)
        own.load_state_dict(states[j])
        assert torch.equal(weight, states[j]["classifier.weight"])
        with torch.no_grad():
            assert torch.allclose(logits, own(x.to(torch.float64)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("padding,flip,cutout", [(4, True, 0), (0, True, 0), (2, False, 0), (0, False, 0),
                                                 (4, True, 3), (0, False, 4)])
def test_a_group_batch_is_each_clients_own_batch(padding, flip, cutout):
    """The fused trainer draws each client's numbers apart (client_draws) and augments the group's batch at once
    (group_batch): client i's slice is exactly the batch train() would have drawn from the same generator (order,
    crop offsets, flips), step for step, including the steps where only some clients still have a batch."""
    datas = synthetic_clients()
    opt = OptimConfig(lr=0.1, batch_size=16, schedule="cosine")
    cfg = load_config(None, [f"data.crop_padding={padding}", f"data.flip={flip}", f"data.cutout={cutout}"])
    augment = augment_for(cfg, datas[0])
    own = [list(batch_schedule(d, opt, epochs=2.0, steps=None, generator=torch_generator(1, j), augment=augment))
           for j, d in enumerate(datas)]
    draws = [list(client_draws(d, opt, torch_generator(1, j), augment, epochs=2.0, steps=None))
             for j, d in enumerate(datas)]
    assert [len(d) for d in draws] == [len(o) for o in own] == [6, 8, 12, 4]  # 33 samples: batches of one dropped
    groups = 0
    for step in range(12):
        for size in {len(draws[j][step][0]) for j in range(4) if step < len(draws[j])}:  # as fused_train groups
            members = [j for j in range(4) if step < len(draws[j]) and len(draws[j][step][0]) == size]
            xs, ys = group_batch([datas[j] for j in members], [draws[j][step][:2] for j in members], augment)
            for i, j in enumerate(members):
                x, y, lr = own[j][step]
                assert torch.equal(xs[i], x) and torch.equal(ys[i], y) and draws[j][step][2] == lr
            groups += 1
    assert groups == 15  # 12 steps; step 2 has batches of 5 and 16, step 5 of 5, 16 and 10


def test_engine_key_is_validated():
    from fedlt.errors import FedLTError

    assert load_config(None, []).federation.engine == "flower"
    assert load_config(None, ["federation.engine=fused"]).federation.engine == "fused"
    with pytest.raises(FedLTError, match="federation.engine"):
        load_config(None, ["federation.engine=gpu"])


# --------------------------------------------------------------------------- whole runs, both engines
ENGINE_RUNS = {
    "fedavg": ["strategy.name=fedavg"],
    "fedprox": ["strategy.name=fedprox", "strategy.mu=0.5"],
    "fedlc": ["strategy.name=fedlc"],
    "local_loss": ["strategy.name=fedavg", "client.name=local_loss", "client.loss=balanced_softmax"],
    "gbme": ["strategy.name=gbme", "model.name=small_cnn_experts", "strategy.joint_fraction=0.5"],
    "fedloge": ["strategy.name=fedloge", "client.sse_steps=10"],  # per-client local heads, sent apart
    "fedrod": ["strategy.name=fedrod"],  # per-client personal heads, sent apart and kept by the strategy
    "tde": ["strategy.name=fedavg", "client.name=tde"],  # ē: a buffer its head updates in the forward pass
    "area": ["strategy.name=fedavg", "client.name=area"],  # a feature pass per client before training (prepare)
    "fedgrab": ["strategy.name=fedgrab", "strategy.controlled=all"],  # per-client balancers, kept by the strategy
    # each client's update clipped to C by the ClientApp's mod (C = 0.01 binds: these updates are ~1)
    "dp_client_fixed": ["strategy.name=dp_client_fixed", "strategy.clipping_norm=0.01", "strategy.noise_multiplier=0"],
}
FASHION = ["mode=federated", "partition.num_clients=4", "federation.fraction=0.75", "train.batch_size=32",
           "model.name=resnet8", "data.imbalance_factor=100", "eval.batch_size=4096"]


def checkpoint_state(path):
    return torch.load(path / "checkpoint.pt", weights_only=False)["state"]["model"]


@pytest.fixture
def float64_default():
    """Models, inputs and the CE loss in float64 for the duration of a test (torch's default dtype)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def first_2000_test_images(monkeypatch):
    """The test set cut to its first 2,000 images (float64 convolutions are slow on CPUs)."""
    from fedlt.experiment import Experiment

    tensor_data = Experiment.tensor_data

    def first_2000(self, split="train", indices=None, device="cpu"):
        if split == "test" and indices is None:
            indices = np.arange(2000)
        return tensor_data(self, split, indices, device)

    monkeypatch.setattr(Experiment, "tensor_data", first_2000)


@needs_fashion
@pytest.mark.parametrize("method", [m if m == "fedavg" else pytest.param(m, marks=[pytest.mark.slow, pytest.mark.heavy])
                                    for m in ENGINE_RUNS])
def test_one_round_gives_the_same_weights_in_both_engines(method, tmp_path, monkeypatch, float64_default,
                                                           first_2000_test_images):
    """In float64, where the grouped and the plain convolution round alike (~1e-16; in float32 they drift apart
    by up to 4e-4 in these 4 steps), so any difference is one of arithmetic: data order, augmentation,
    optimizer, aggregation."""
    from fedlt.federation import fused

    rounds = 2 if method == "gbme" else 1  # gbme: round 2 is its expert phase (one sub-round per expert)
    cfg = load_config(None, FASHION + ENGINE_RUNS[method] + [f"federation.rounds={rounds}", "train.local_steps=4",
                                                            "eval.every=10"])
    answered = []
    original = fused.fused_replies
    monkeypatch.setattr(fused, "fused_replies",
                        lambda cfg, device, m, items: answered.append(len(items)) or original(cfg, device, m, items))
    from fedlt.federation import inprocess

    # the grid deep-copies each message a ClientApp receives and its reply; the fused trainer reads the
    # strategy's message itself and its reply is kept as built
    copied = {"message": 0, "reply": 0}
    deepcopy = inprocess.copy.deepcopy

    def counted(x, *args):
        if isinstance(x, Message) and x.metadata.message_type == "train":
            copied["reply" if x.metadata.reply_to_message_id else "message"] += 1
        return deepcopy(x, *args)

    monkeypatch.setattr(inprocess.copy, "deepcopy", counted)
    clipped = []  # the fused replies that went through the DP clipping mod
    clipping_mod = fused.client_clipping_mod
    monkeypatch.setattr(fused, "client_clipping_mod", lambda *a: clipped.append(a[0]) or clipping_mod(*a))
    run_inprocess(cfg, str(tmp_path / "inprocess"))
    assert copied["message"] and copied["reply"]
    copied.update(message=0, reply=0)
    run_fused(cfg, str(tmp_path / "fused"))
    dp = method == "dp_client_fixed"  # the mod's message is a copy: it sets records aside on it
    assert copied == {"message": 3 if dp else 0, "reply": 0} and len(clipped) == (3 if dp else 0)
    # gbme: the joint round's 3 clients, then each expert's cohort as the release sizes it: S·β = 3·0.8 = 2.4, so
    # int(2.4) = 2 clients (strategies/gbme/prior.py sample_expert_cohort)
    expected = [3] if method != "gbme" else [3, 2, 2, 2]
    assert answered == expected  # every train message of the run went to the fused trainer
    a, b = checkpoint_state(tmp_path / "inprocess"), checkpoint_state(tmp_path / "fused")
    assert a.keys() == b.keys() and next(iter(a.values())).dtype == torch.float64  # the run really was float64
    if method != "gbme":  # resnet8's BatchNorm buffers are compared too (gbme's small_cnn_experts has GroupNorm)
        assert any("running_mean" in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-10), k
    if method == "fedloge":  # each client's l_k, trained beside the model and kept by the strategy
        heads = [torch.load(tmp_path / e / "checkpoint.pt", weights_only=False)["state"]["strategy"]["local_heads"]
                 for e in ("inprocess", "fused")]
        assert heads[0].keys() == heads[1].keys() and len(heads[0]) == 3  # the round's 3 clients
        for pid, (w, bias) in heads[0].items():
            assert torch.allclose(heads[1][pid][0], w, rtol=1e-9, atol=1e-10)
            assert torch.allclose(heads[1][pid][1], bias, rtol=1e-9, atol=1e-10)
    if method == "fedrod":  # each client's p_k, trained beside the model and kept by the strategy
        heads = [torch.load(tmp_path / e / "checkpoint.pt", weights_only=False)["state"]["strategy"]["personal"]
                 for e in ("inprocess", "fused")]
        assert heads[0].keys() == heads[1].keys() == set(range(4))
        for pid, head in heads[0].items():
            assert all(torch.allclose(heads[1][pid][k], v, rtol=1e-9, atol=1e-10) for k, v in head.items())
        weights = [h["weight"] for h in heads[0].values()]  # 3 trained this round, 1 the initial copy
        assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])
    if method == "fedgrab":  # each client's balancer state after its round, sent back and kept by the strategy
        sgb = [torch.load(tmp_path / e / "checkpoint.pt", weights_only=False)["state"]["strategy"]["sgb"]
               for e in ("inprocess", "fused")]
        assert sgb[0].keys() == sgb[1].keys() and len(sgb[0]) == 3  # the round's 3 clients
        for pid, state in sgb[0].items():
            assert state.keys() == sgb[1][pid].keys() and any(v != 0 for v in state["sgb-pos"])
            for k, v in state.items():
                np.testing.assert_allclose(sgb[1][pid][k], v, rtol=1e-9, atol=1e-12, err_msg=f"{pid} {k}")
    rows = [[json.loads(x) for x in (tmp_path / e / "metrics.jsonl").read_text().splitlines()]
            for e in ("inprocess", "fused")]
    rows = [[r for r in rs if r["round"] > 0] for rs in rows]  # round 0: the initial model, nothing trained
    assert [r["clients"] for r in rows[0]] == [r["clients"] for r in rows[1]]
    # fedlc's, local_loss's and gbme's losses cast the logits to float32 (``.float()``) even in a float64 run;
    # the fused trainer computes them for the group in one vmapped call, whose float32 sums round differently
    float32_loss = method in ("fedlc", "local_loss", "gbme", "fedloge", "fedrod", "fedgrab")
    assert [r["train_loss"] for r in rows[0]] == pytest.approx([r["train_loss"] for r in rows[1]],
                                                               rel=1e-6 if float32_loss else 1e-9)


@pytest.fixture
def grid(monkeypatch):
    """A fused grid of 4 Fashion-MNIST-LT clients, in a process set up as the server's (run_on_grid) is."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedlt.federation.inprocess import TASK_ID

    grid = fused_module.FusedGrid(load_config(None, FASHION + ["federation.engine=fused"]), 4)
    for name, value in [("_task_id", TASK_ID), ("_run_id", grid.run.run_id), ("_node_id", SUPERLINK_NODE_ID)]:
        monkeypatch.setattr(TaskIdentity, name, value)
    return grid


def test_the_fused_grid_copies_only_the_messages_a_client_app_answers(monkeypatch, grid):
    """A message the fused trainer does not take (here a cohort of one) reaches the ClientApp as a copy, as over
    the wire, and its reply is copied too; the strategy's message is left as it was sent."""
    from flwr.app import ConfigRecord, RecordDict

    received = []

    def client_app(app, msg, context):
        received.append(msg)
        msg.content["config"]["server-round"] = 99  # a node's own edit stays on its copy
        return Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)

    monkeypatch.setattr(fused_module, "call_client_app", client_app)
    node = next(iter(grid.get_node_ids()))
    sent = grid.create_message(RecordDict({"config": ConfigRecord({"server-round": 1})}), "train", node, "1")
    (reply,) = grid.send_and_receive([sent])
    assert received and received[0] is not sent and received[0].metadata.message_id == sent.metadata.message_id
    assert sent.content["config"]["server-round"] == 1
    assert reply.content["config"]["ok"] == 1 and reply.metadata.reply_to_message_id == sent.metadata.message_id


@pytest.mark.parametrize("engine", ["fused", "hosts"])
def test_the_plan_says_when_a_methods_clients_cannot_fuse(engine):
    """A client method with its own loop trains one by one under the fused engine and on host nodes: the line
    said before the first round (and the dry run's) says so; a method that fuses adds nothing."""
    from types import SimpleNamespace

    from fedlt.run_loop import plan_line

    keys = ["federation.engine=fused"] if engine == "fused" else ["federation.hosts=2"]
    steps = SimpleNamespace(total=3, unit="round")
    glmc = plan_line(load_config(None, FASHION + keys + ["client.name=glmc"]), steps)
    assert "each (not fused: client method glmc trains with its own loop (fit), so its clients train one by " \
           "one);" in glmc
    assert "not fused" not in plan_line(load_config(None, FASHION + keys), steps)
    assert "not fused" not in plan_line(load_config(None, FASHION + ["client.name=glmc"]), steps)  # flower engine


@pytest.mark.parametrize("engine", ["fused", "hosts"])
def test_state_a_client_method_keeps_on_self_is_each_clients_own_when_fused(engine, tmp_path, monkeypatch):
    """A client method that keeps what ``prepare`` finds (its number of local classes) on ``self`` until
    ``round_metrics`` (tests/plugins_for_tests/hooks.py): the fused trainer shared one instance among a
    round's clients, all set up before any trained, so every reply reported the last client's number to the
    strategy (10, 10, 10, 10 where the ClientApp's were 8, 8, 10, 10)."""
    fused_groups = []
    original = fused_module.fused_replies
    monkeypatch.setattr(fused_module, "fused_replies", lambda cfg, device, method, items: fused_groups.append(
        len(items)) or original(cfg, device, method, items))
    torch.set_num_threads(1)
    args = ["plugins=[plugins_for_tests.hooks]", "mode=federated", "data.name=tiny_synthetic",
            "data.imbalance_factor=10", "data.crop_padding=0", "data.flip=false", "model.name=small_cnn",
            "partition.num_clients=4", "partition.alpha=0.1", "federation.rounds=1", "train.local_steps=2",
            "eval.every=10", "strategy.name=local_classes_seen"]
    one_by_one = run_inprocess(load_config(None, args), str(tmp_path / "inprocess"))
    assert fused_groups == []
    engine_keys = {"fused": ["federation.engine=fused"], "hosts": ["federation.hosts=1"]}[engine]
    run = run_fused if engine == "fused" else run_inprocess
    fused = run(load_config(None, args + engine_keys), str(tmp_path / engine))
    assert fused_groups == [4]  # the whole cohort trained as one fused group
    counts = json.loads((tmp_path / "inprocess" / "partition.json").read_text())["client_class_counts"]
    expected = {str(pid): int(np.count_nonzero(c)) for pid, c in enumerate(counts)}
    assert len(set(expected.values())) > 1  # clients of different numbers of classes, or the test shows nothing
    assert one_by_one["local_classes"] == expected
    assert fused["local_classes"] == expected


@needs_fashion
def test_a_fused_round_that_falls_back_says_why_once(monkeypatch, capsys, grid):
    """A group that raises NotFusable goes to the ClientApp one by one, and the reason is said once a process,
    not every round."""
    from flwr.app import ConfigRecord, RecordDict

    monkeypatch.setattr(fused_module, "_SAID", set())

    def refuse(*args, **kwargs):
        raise fused_module.NotFusable("a client objective reads model.thing, which the fused engine does not offer")

    monkeypatch.setattr(fused_module, "fused_train", refuse)
    answered = []
    monkeypatch.setattr(fused_module, "call_client_app", lambda app, msg, context: answered.append(msg) or Message(
        RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg))
    nodes = list(grid.get_node_ids())[:2]
    for server_round in (1, 2):
        msgs = [grid.create_message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), "train",
                                    node, str(server_round)) for node in nodes]
        assert len(list(grid.send_and_receive(msgs))) == 2
    assert len(answered) == 4  # every client of both rounds, by the ClientApp
    out = capsys.readouterr().out
    assert out.count("note: a fused round's clients train one by one (the ClientApp's loop), as fused training "
                     "cannot: a client objective reads model.thing") == 1


@needs_fashion
@pytest.mark.slow
@pytest.mark.heavy
def test_five_rounds_give_the_same_accuracy_in_both_engines_in_float64(tmp_path, float64_default,
                                                                        first_2000_test_images):
    """Five whole rounds (resnet8 with BatchNorm, 3 of 4 clients a round) give the same model in both engines.

    In float32 the two runs drift apart (33.73 vs 31.36 % after these five rounds): the grouped convolution
    rounds differently from the plain one, the round-1 weights agree to float32 tolerance and the model's
    fast-learning phase amplifies the difference. In float64 the rounding is ~1e-16 and nothing is left to
    amplify, so a difference here would be a difference of arithmetic (data order, augmentation, optimizer,
    aggregation), which is what the engines must not have."""
    cfg = load_config(None, FASHION + ["federation.rounds=5", "train.local_steps=10", "eval.every=5"])
    a = run_inprocess(cfg, str(tmp_path / "inprocess"))
    b = run_fused(cfg, str(tmp_path / "fused"))
    sa, sb = checkpoint_state(tmp_path / "inprocess"), checkpoint_state(tmp_path / "fused")
    assert next(iter(sa.values())).dtype == torch.float64  # the run really was float64
    assert a["accuracy"] > 0.2  # it learned (chance is 0.1; 29 % on the whole test set)
    assert abs(a["accuracy"] - b["accuracy"]) <= 0.005
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=1e-6, atol=1e-8), k
