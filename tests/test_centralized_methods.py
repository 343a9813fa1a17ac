"""Centralized method zoo: formulas of the classifier adjustments, strong augmentation, a 1-epoch smoke run
of every method on a tiny synthetic set (through ``run_centralized``), resumability across stages, configs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedlt.centralized as C
import fedlt.centralized.run as R
from conftest import resumed_after_cut
from fedlt.config import load_config
from fedlt.data.augment import auto_augment, cutout, strong_augment
from fedlt.data.sources import Split
from fedlt.errors import FedLTError
from fedlt.experiment import Experiment
from fedlt.registry import CENTRALIZED, LOSSES
from fedlt.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["ce", "focal", "reweight", "cb", "ldam_drw", "la", "balanced_softmax", "bal_bce", "posthoc_la", "crt",
           "tau_norm", "lws", "mixup", "mislas", "balpoe", "mdcs"]


def test_every_method_is_registered():
    assert set(METHODS) <= set(CENTRALIZED)


def test_tau_norm_weight():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # row norms 5 and 2
    assert C.tau_normalized_weight(w, 1.0).flatten().tolist() == pytest.approx([0.6, 0.8, 0.0, 1.0])
    # τ = 0.5: w / sqrt(‖w‖) = (3/√5, 4/√5), (0, 2/√2)
    assert C.tau_normalized_weight(w, 0.5).flatten().tolist() == pytest.approx([1.3416408, 1.7888544, 0.0, 1.4142136])
    head = nn.Linear(2, 2)
    head.weight.data.copy_(w)
    h = torch.tensor([[1.0, 1.0]])
    # bias dropped: (0.6 + 0.8, 0 + 1)
    assert C.TauNormLinear(head, 1.0)(h)[0].tolist() == pytest.approx([1.4, 1.0])


def test_lws_classifier_and_frozen_features():
    head = nn.Linear(2, 2)
    head.weight.data.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    head.bias.data.copy_(torch.tensor([1.0, -1.0]))
    lws = C.LWSClassifier(head, 2)
    lws.scales.data.copy_(torch.tensor([2.0, 0.5]))
    # f_c·(w_c^T h + b_c) with h = (1, 3): 2·(1 + 1), 0.5·(3 − 1)
    assert lws(torch.tensor([[1.0, 3.0]]))[0].tolist() == pytest.approx([4.0, 1.0])
    assert [p.requires_grad for p in lws.parameters()] == [True, False, False]
    bn = nn.BatchNorm1d(2)
    frozen = C.FrozenFeatures(bn).train()
    assert frozen.training
    assert not bn.training and not any(p.requires_grad for p in bn.parameters())
    assert C.FrozenFeatures(nn.BatchNorm1d(2), shift_bn=True).train().inner.training


def test_posthoc_and_ldam_transforms():
    cfg = load_config(None, ["mode=centralized", "centralized.method=posthoc_la"])
    m = CENTRALIZED.get("posthoc_la")(cfg, np.array([3, 1]))
    # z − log π with π = (0.75, 0.25)
    assert m.transform_logits(torch.zeros(1, 2))[0].tolist() == pytest.approx([0.2876821, 1.3862944], abs=1e-6)
    cfg = load_config(None, ["mode=centralized", "centralized.method=ldam_drw", "centralized.epochs=200"])
    m = CENTRALIZED.get("ldam_drw")(cfg, np.array([3, 1]))
    assert m.drw_epoch() == 160  # 0.8 of 200
    assert m.transform_logits(torch.ones(1, 2)).tolist() == [[30.0, 30.0]]


def test_loss_methods_build_their_objective_from_the_registry():
    counts = np.array([16, 1])
    model = nn.Linear(2, 2)
    x, y = torch.tensor([[0.5, 0.2], [0.3, -0.1]]), torch.tensor([0, 1])
    z = model(x)
    cases = [("ce", "ce", {}), ("focal", "focal", {"gamma": 1.0}), ("reweight", "reweight", {}),
             ("cb", "cb", {"beta": 0.9999, "reduction": "mean"}), ("la", "la", {"tau": 1.0}),
             ("balanced_softmax", "balanced_softmax", {}),
             ("bal_bce", "bal_bce", {"smoothing": 0.1}), ("posthoc_la", "ce", {}), ("crt", "ce", {})]
    for method, loss, options in cases:
        m = CENTRALIZED.get(method)(load_config(None, ["mode=centralized", f"centralized.method={method}"]), counts)
        expected = LOSSES.get(loss)(torch.as_tensor(counts), **options)(z, y)
        assert m.objective(0)(model, x, y).item() == pytest.approx(expected.item(), rel=1e-6), method
    # LDAM-DRW: unweighted LDAM before round(0.8·10) = 8 epochs, class-balanced (β = 0.9999) from epoch 8
    m = CENTRALIZED.get("ldam_drw")(load_config(None, ["mode=centralized", "centralized.method=ldam_drw"]), counts)
    assert m.loss_options(7)["beta"] is None and m.loss_options(8)["beta"] == 0.9999
    plain = LOSSES.get("ldam")(torch.as_tensor(counts))(z, y).item()
    drw = LOSSES.get("ldam")(torch.as_tensor(counts), beta=0.9999)(z, y).item()
    assert m.objective(7)(model, x, y).item() == pytest.approx(plain)
    assert m.objective(8)(model, x, y).item() == pytest.approx(drw) and drw != pytest.approx(plain)


def test_mdcs_ramp():
    cfg = load_config(None, ["mode=centralized", "centralized.method=mdcs", "centralized.epochs=200"])
    m = CENTRALIZED.get("mdcs")(cfg, np.array([3, 1]))
    # MDCSLoss: 0.6·min(epoch/20, 1) with the official trainer's epoch = 1, 2, … (fedlt's 0-based index + 1)
    official = lambda epoch: 0.6 * min(epoch / 20, 1.0)
    assert [m.kl_weight(e) for e in (0, 9, 18, 19, 100)] == pytest.approx([official(e + 1) for e in (0, 9, 18, 19, 100)])
    assert m.kl_weight(0) == pytest.approx(0.03)


def test_cutout_square():
    x = torch.ones(64, 1, 10, 10)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    holes = (out == 0).sum((1, 2, 3))
    assert holes.max().item() == 16 and holes.min().item() >= 4  # clipped at the border, at least 2×2 left
    for img in out[:, 0]:
        rows, cols = torch.nonzero(img == 0, as_tuple=True)
        assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle


def test_auto_augment_per_image_vs_per_batch():
    x = torch.rand(1, 3, 16, 16).expand(32, 3, 16, 16).contiguous()
    per_image = auto_augment(x, torch.Generator().manual_seed(0), chunk=1)
    per_batch = auto_augment(x, torch.Generator().manual_seed(0), chunk=32)
    distinct = lambda y: len({tuple(v.flatten()[:64].tolist()) for v in y})  # noqa: E731
    assert distinct(per_batch) == 1  # torchvision draws one sub-policy per call
    assert distinct(per_image) > 4  # one per image here
    again = auto_augment(x, torch.Generator().manual_seed(0), chunk=1)
    assert torch.equal(per_image, again)
    out = strong_augment(torch.zeros(4, 1, 8, 8), torch.tensor([0.5]), torch.tensor([0.25]),
                         torch.Generator().manual_seed(0), cutout_size=4)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()


def official_cutout_then_normalize(img01: torch.Tensor, y: int, x: int, length: int, mean, std) -> torch.Tensor:
    """NCL ``lib/dataset/autoaug.py`` ``Cutout`` (img * mask, the mask 0 on [y ± length/2) × [x ± length/2) clipped),
    applied after ``ToTensor`` and before ``Normalize`` (``cui_cifar.py``; SHIKE, MDCS and CC-SAM order it so)."""
    h, w = img01.shape[1:]
    mask = torch.ones(h, w)
    mask[max(y - length // 2, 0):min(y + length // 2, h), max(x - length // 2, 0):min(x + length // 2, w)] = 0
    return (img01 * mask - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_the_strong_views_cutout_hole_is_black_and_autoaugment_fills_grey(monkeypatch):
    """Cutout before normalisation, as the official pipelines: the hole is pixel 0, i.e. −mean/std once
    normalised (it was 0, the mean colour); AutoAugment's shear/translate/rotate fill is DeepVoltaire's grey 128."""
    import fedlt.data.augment as A

    mean, std = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]
    img01 = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    normalised = (img01 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    monkeypatch.setattr(A, "auto_augment", lambda x01, generator, chunk: x01)  # Cutout alone
    g = torch.Generator().manual_seed(3)
    out = strong_augment(normalised, torch.tensor(mean), torch.tensor(std), g, cutout_size=4)
    g = torch.Generator().manual_seed(3)
    cy, cx = torch.randint(0, 12, (1,), generator=g).item(), torch.randint(0, 12, (1,), generator=g).item()
    official = official_cutout_then_normalize(img01[0], cy, cx, 4, mean, std)
    torch.testing.assert_close(out[0], official, atol=1e-5, rtol=1e-5)
    monkeypatch.undo()
    from torchvision.transforms import v2

    seen = []
    real = v2.AutoAugment.__init__
    monkeypatch.setattr(v2.AutoAugment, "__init__", lambda self, *a, **k: (seen.append(k.get("fill")),
                                                                            real(self, *a, **k))[1])
    auto_augment(torch.rand(2, 3, 8, 8), torch.Generator().manual_seed(0))
    assert seen == [128 / 255]


def tiny_experiment(num_classes=4, size=12):
    g = torch.Generator().manual_seed(0)
    counts = [40, 16, 8, 4][:num_classes]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    test_labels = np.repeat(np.arange(num_classes), 8)

    def images(lab):
        base = torch.randint(0, 60, (len(lab), 1, size, size), generator=g, dtype=torch.uint8)
        return base + torch.as_tensor(lab, dtype=torch.uint8)[:, None, None, None] * 50  # learnable by brightness

    train = Split(labels=labels, num_classes=num_classes, images=images(labels))
    test = Split(labels=test_labels, num_classes=num_classes, images=images(test_labels))
    return Experiment(train, test, [np.arange(len(labels))], torch.tensor([0.5]), torch.tensor([0.25]), 1)


def tiny_cfg(method, *extra):
    return load_config(None, ["mode=centralized", f"centralized.method={method}", "centralized.epochs=1",
                              "centralized.batch_size=16", "model.name=small_cnn", "device=cpu", *extra])


@pytest.mark.parametrize("method", METHODS)
def test_smoke_one_epoch(method, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    extra = ["centralized.stage2_epochs=1"] if method in ("crt", "lws", "mislas") else []
    one_epoch = ["centralized.stage2_schedule=cosine"] if method in ("crt", "lws") else []  # theirs: lr 0 in it
    cfg = tiny_cfg(method, *extra, *one_epoch)
    summary = C.run_centralized(cfg, RunDir(tmp_path))
    for key in ("accuracy", "balanced_accuracy", "loss", "ece"):
        assert math.isfinite(summary[key]), key
    assert all(summary[g] is None or math.isfinite(summary[g]) for g in ("many", "medium", "few"))
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(2 + len(extra)))  # epoch 0: the initial model


def test_autoaugment_option(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("balanced_softmax", "centralized.autoaugment=true", "centralized.cutout=4")
    method = CENTRALIZED.get("balanced_softmax")(cfg, np.array([40, 16, 8, 4]))
    aug = method.augment(R.experiment_for(cfg).tensor_data())
    assert isinstance(aug, C.StrongView) and aug.cutout == 4
    assert math.isfinite(C.run_centralized(cfg, RunDir(tmp_path))["accuracy"])
    with pytest.raises(FedLTError, match="centralized.autoaugment"):  # MDCS fixes its own two views
        tiny_cfg("mdcs", "centralized.autoaugment=true")


def test_stage2_resumes(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    cfg = tiny_cfg("lws", "centralized.epochs=2", "centralized.stage2_epochs=2")
    full = C.run_centralized(cfg, RunDir(tmp_path / "full"))
    resumed, _ = resumed_after_cut(C.run_centralized, cfg, RunDir(tmp_path / "cut"), 3, monkeypatch)
    assert resumed["accuracy"] == full["accuracy"] and resumed["loss"] == pytest.approx(full["loss"])


STAGE2_KEYS = ["centralized.stage2_batch_size=8", "centralized.stage2_weight_decay=0",
               "centralized.stage2_warmup_epochs=1", "centralized.stage2_schedule=step",
               "centralized.stage2_milestones=[1]", "centralized.stage2_gamma=0.5", "centralized.stage2_lr=0.2"]


def test_stage2_keys_reach_the_stage2_optimizer(monkeypatch):
    torch.set_num_threads(1)
    seen, real = [], R.train
    monkeypatch.setattr(R, "train", lambda *a, **k: seen.append((k["opt"], k["optimizer"])) or real(*a, **k))
    cfg = tiny_cfg("crt", "centralized.weight_decay=5e-4", "centralized.stage2_epochs=2", *STAGE2_KEYS)
    steps = R.CentralizedSteps(cfg, tiny_experiment(), torch.device("cpu"))
    for t in (1, 2, 3):
        steps.step(t)
    (opt1, sgd1), (opt2, sgd2), (opt2_again, _) = seen
    assert (opt1.batch_size, sgd1.param_groups[0]["weight_decay"]) == (16, 5e-4)
    assert (opt2.batch_size, sgd2.param_groups[0]["weight_decay"], opt2_again) == (8, 0.0, opt2)
    assert [opt2.lr_at(e + 0.5, 2) for e in (0, 1)] == [0.2, 0.1]  # warm-up lr·1/1, then ×0.5 from epoch 1
    assert sgd2.param_groups[0]["lr"] == pytest.approx(0.1)  # the lr of stage 2's last step


@pytest.mark.parametrize("method,schedule", [("crt", "cosine_epoch_end"), ("lws", "cosine_epoch_end"),
                                             ("mislas", "cosine_epoch"), ("cc_sam", "constant")])
def test_stage2_keys_left_unset_keep_stage1s_values_and_the_methods_schedule(method, schedule):
    extra = ["centralized.sam=cc_sam"] if method == "cc_sam" else []
    cfg = tiny_cfg(method, "centralized.weight_decay=3e-4", *extra)
    base, opt2 = R.centralized_optim(cfg), R.stage2_optim(cfg, CENTRALIZED.get(method)(cfg, np.array([40, 16, 8, 4])))
    assert (opt2.batch_size, opt2.weight_decay, opt2.warmup_epochs, opt2.schedule) == (16, 3e-4, 0.0, schedule)
    assert opt2.momentum == base.momentum
    cfg = tiny_cfg(method, "centralized.stage2_schedule=cosine", *extra)
    assert R.stage2_optim(cfg, CENTRALIZED.get(method)(cfg, np.array([40, 16, 8, 4]))).schedule == "cosine"


def test_sampler_option_and_unknown_key():
    cfg = tiny_cfg("focal", "centralized.sampler=sqrt", "centralized.focal_gamma=2")
    assert cfg.centralized.sampler == "sqrt" and cfg.centralized.focal_gamma == 2.0
    from fedlt.errors import FedLTError
    with pytest.raises(FedLTError):
        tiny_cfg("ce", "centralized.focal_gamma=2")
    with pytest.raises(FedLTError):
        CENTRALIZED.get("ce")(tiny_cfg("ce", "centralized.sampler=nope"), np.array([3, 1]))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_config_validates(path):
    cfg = load_config(path)
    assert cfg.centralized.method in CENTRALIZED


def test_eval_every_skips_evaluations_but_not_training(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(R, "experiment_for", lambda cfg: tiny_experiment())
    every = C.run_centralized(tiny_cfg("ce", "centralized.epochs=3", "eval.every=2"), RunDir(tmp_path / "every"))
    full = C.run_centralized(tiny_cfg("ce", "centralized.epochs=3"), RunDir(tmp_path / "full"))
    rows = [json.loads(r) for r in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert [("accuracy" in r, "train_loss" in r) for r in rows] == [(True, False), (False, True), (True, True),
                                                                   (True, True)]  # epoch 0: the initial model
    assert every["accuracy"] == full["accuracy"] and every["per_class"] == full["per_class"]


@pytest.mark.parametrize("method", ["balpoe", "mdcs"])
def test_a_multi_expert_method_refuses_a_model_without_experts_when_the_config_is_read(method):
    with pytest.raises(FedLTError, match=rf"centralized.method={method} needs a multi-expert model, and "
                                         r"'resnet20_experts' is not registered: set model.name to one of .*resnet32_experts"):
        load_config(None, ["mode=centralized", "model.name=resnet20", f"centralized.method={method}"])
    assert load_config(None, ["mode=centralized", "model.name=resnet32", f"centralized.method={method}"])


def test_the_plan_line_says_a_fractional_epoch_count():
    """centralized.epochs=0.25 trains a quarter of an epoch: the line said before training said '1 epoch' (and the
    dry run 0.25 epochs); it says both now."""
    from types import SimpleNamespace

    from fedlt.run_loop import plan_line

    steps = SimpleNamespace(total=1, unit="epoch")
    line = plan_line(load_config(None, ["mode=centralized", "centralized.epochs=0.25"]), steps)
    assert line.startswith("1 epoch (centralized.epochs=0.25: its last epoch is a partial one);")
    assert "partial" not in plan_line(load_config(None, ["mode=centralized", "centralized.epochs=2"]), steps)


def official_gbme_cutout(img: torch.Tensor, y: int, x: int, length: int = 16) -> torch.Tensor:
    """Spinozaaa/Federated-Long-tailed-Learning fedml_api/data_preprocessing/cifar100/data_loader.py ``Cutout``
    (appended after ``Normalize``): img * mask, the mask 0 on [clip(y − L//2), clip(y + L//2)) × the same in x."""
    h, w = img.shape[1:]
    mask = torch.ones(h, w)
    mask[int(np.clip(y - length // 2, 0, h)):int(np.clip(y + length // 2, 0, h)),
         int(np.clip(x - length // 2, 0, w)):int(np.clip(x + length // 2, 0, w))] = 0
    return img * mask.expand_as(img)


@pytest.mark.parametrize("length", [16, 5])
def test_data_cutout_is_gbmes_cutout_after_normalisation(length):
    """``data.cutout``: crop/flip as before (the same draws), then the official Cutout on the normalised batch at
    the centres drawn next; an odd length leaves a hole of length − 1, as the official arithmetic does."""
    from fedlt.data.augment import cutout_draws
    from fedlt.train import Augment

    mean, std = torch.tensor([0.5071, 0.4865, 0.4409]), torch.tensor([0.2673, 0.2564, 0.2762])
    x = torch.randn(8, 3, 32, 32)
    plain = Augment(4, True, mean, std)(x, torch.Generator().manual_seed(5))
    out = Augment(4, True, mean, std, cutout=length)(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    Augment(4, True, mean, std).draw(8, g, (32, 32))  # the crop/flip draws come first
    centres = cutout_draws(8, 32, 32, g)
    for i in range(8):
        torch.testing.assert_close(out[i], official_gbme_cutout(plain[i], *centres[:, i].tolist(), length))
    holes = (out == 0).all(1).sum((1, 2))
    assert holes.max().item() == (length - length % 2) ** 2  # a hole wholly inside: 16×16, or 4×4 for 5
