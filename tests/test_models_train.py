import pytest
import torch

from fedlt.data.augment import normalize, random_crop_flip
from fedlt.models import build_model
from fedlt.train import Augment, OptimConfig, TensorData, predict_logits, prepare_batch, train


def test_resnet32_has_about_046m_parameters_and_split_parts():
    m = build_model("resnet32", 10, 3)
    n = sum(p.numel() for p in m.parameters())
    assert 0.45e6 < n < 0.48e6
    x = torch.randn(2, 3, 32, 32)
    h = m.features(x)
    assert h.shape == (2, 64)
    assert torch.allclose(m.classifier(h), m(x))


@pytest.mark.parametrize("name,c,s", [("small_cnn", 1, 28), ("resnet18", 3, 64), ("resnet50", 3, 64)])
def test_every_model_exposes_features_and_classifier(name, c, s):
    m = build_model(name, 7, c).eval()
    x = torch.randn(2, c, s, s)
    assert m.classifier(m.features(x)).shape == (2, 7)


def test_crop_with_padding_is_a_shift_with_zero_fill():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 1, 1, 1) + 1
    out = random_crop_flip(x, padding=1, generator=torch.Generator().manual_seed(0), flip=False)
    assert out.shape == x.shape
    for img in out:  # every output is the input shifted by (dy, dx) in {-1,0,1}², zeros entering
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if torch.equal(img[0], torch.nn.functional.pad(x[0, 0], (1, 1, 1, 1))[1 + dy:5 + dy, 1 + dx:5 + dx])]
        assert matches
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1  # per-image offsets


def test_flip_flips_about_half():
    x = torch.arange(4.0).reshape(1, 1, 1, 4).repeat(200, 1, 1, 1)
    out = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 3).sum().item()
    assert 60 < flipped < 140 and ((out[:, 0, 0, 0] == 0) | (out[:, 0, 0, 0] == 3)).all()


def test_lr_schedule_warmup_step_cosine():
    opt = OptimConfig(lr=0.1, warmup_epochs=5, schedule="step", milestones=[160, 180], gamma=0.01)
    assert opt.lr_at(0, 200) == pytest.approx(0.02) and opt.lr_at(4.5, 200) == pytest.approx(0.1)
    assert opt.lr_at(100, 200) == pytest.approx(0.1)
    assert opt.lr_at(170, 200) == pytest.approx(1e-3) and opt.lr_at(190, 200) == pytest.approx(1e-5)
    cos = OptimConfig(lr=1.0, schedule="cosine")
    assert cos.lr_at(0, 10) == pytest.approx(1.0) and cos.lr_at(5, 10) == pytest.approx(0.5)


def official_warmup_multistep_lrs(base_lr, milestones, epochs, gamma=0.1, warmup_factor=1 / 3, warmup_epochs=5):
    """The lr of each (0-based) training epoch under WarmupMultiStepLR (KaihuaTang/Long-Tailed-Recognition.pytorch
    classification/utils.py; the same class in Bazinga699/NCL lib/utils/lr_scheduler.py and zzpustc/CC-SAM
    utils/lr_scheduler.py), transcribed: the constructor's initial step sets last_epoch = 0, and the training
    loops (run_networks.py, main/multi_network_train_final.py, train_cifar.py) call scheduler.step() before each
    epoch's batches, so epoch e trains at last_epoch = e + 1."""
    from bisect import bisect_right

    lrs = []
    for e in range(epochs):
        last_epoch = e + 1
        factor = 1
        if last_epoch < warmup_epochs:
            alpha = float(last_epoch) / warmup_epochs
            factor = warmup_factor * (1 - alpha) + alpha
        lrs.append(base_lr * factor * gamma ** bisect_right(milestones, last_epoch))
    return lrs


@pytest.mark.parametrize("lr,milestones,gamma,epochs", [(0.2, [120, 160], 0.01, 200),  # TDE causal_norm_32.yaml
                                                        (0.1, [320, 360], 0.1, 400),  # NCL cifar100_im100_NCL*.yaml
                                                        (0.1, [160, 180], 0.1, 200)])  # CC-SAM Cifar10/100.json
def test_warmup_factor_gives_the_official_warmup_multistep_schedule(lr, milestones, gamma, epochs):
    """warmup_factor 1/3 and every milestone one epoch early reproduce WarmupMultiStepLR as the official loops step
    it (warm-up lr·7/15, 9/15, 11/15, 13/15, then lr; decay from epoch m − 1); the default factor 0 does not."""
    official = official_warmup_multistep_lrs(lr, milestones, epochs, gamma)
    opt = OptimConfig(lr=lr, warmup_epochs=5, warmup_factor=1 / 3, schedule="step",
                      milestones=[m - 1 for m in milestones], gamma=gamma)
    assert [opt.lr_at(e + 0.5, epochs) for e in range(epochs)] == pytest.approx(official)
    assert official[:5] == pytest.approx([lr * k / 15 for k in (7, 9, 11, 13, 15)])
    plain = OptimConfig(lr=lr, warmup_epochs=5, schedule="step", milestones=milestones, gamma=gamma)
    assert plain.lr_at(0, epochs) == pytest.approx(lr / 5)
    assert plain.lr_at(milestones[0] - 1, epochs) == pytest.approx(lr)


def test_cosine_epoch_is_cosine_annealing_stepped_once_per_epoch():
    """ynu-yangpeng/GLMC GLMC-2023/Trainer.py: CosineAnnealingLR(optimizer, T_max=epochs), train_scheduler.step()
    after each epoch's batches; every batch of epoch e runs at that epoch's value (fedlt's plain cosine decays
    within the epoch); configs/centralized/cifar_lt_glmc.yaml uses it."""
    from fedlt.centralized.run import centralized_optim
    from fedlt.sweep import expand

    epochs, lr = 200, 0.01
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9, weight_decay=5e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=epochs)
    official = []
    for _ in range(epochs):
        official.append(sgd.param_groups[0]["lr"])
        sgd.step()
        scheduler.step()
    opt = OptimConfig(lr=lr, schedule="cosine_epoch")
    for frac in (0.0, 0.5, 0.99):
        assert [opt.lr_at(e + frac, epochs) for e in range(epochs)] == pytest.approx(official, abs=1e-12)
    assert OptimConfig(lr=lr, schedule="cosine").lr_at(0.5, epochs) < official[0]
    (cfg, _), = expand("configs/centralized/cifar_lt_glmc.yaml")
    glmc = centralized_optim(cfg)
    assert (glmc.schedule, glmc.lr, glmc.warmup_epochs) == ("cosine_epoch", lr, 0)


def toy_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    images[labels == 1, :, :4, :] = 200  # class 1: bright top half
    images += torch.randint(0, 30, images.shape, generator=g, dtype=torch.uint8)
    return TensorData(images, labels, torch.tensor([0.5]), torch.tensor([0.5]), 2)


def test_train_learns_a_separable_toy_problem_and_is_deterministic():
    def run():
        torch.manual_seed(0)
        m = build_model("small_cnn", 2, 1, width=8)
        r = train(m, toy_data(), opt=OptimConfig(lr=0.05, batch_size=32), epochs=6,
                  generator=torch.Generator().manual_seed(1), augment=Augment(1, True))
        return m, r
    m1, r1 = run()
    m2, r2 = run()
    acc = (predict_logits(m1, toy_data(seed=1)).argmax(1) == toy_data(seed=1).labels).float().mean()
    assert acc > 0.95
    assert r1.steps == 6 * 8 and r1.loss == r2.loss
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_train_by_steps():
    m = build_model("small_cnn", 2, 1, width=4)
    r = train(m, toy_data(), opt=OptimConfig(batch_size=32), steps=5, generator=torch.Generator().manual_seed(0))
    assert r.steps == 5 and r.num_examples == 160


def test_multi_expert_model_runs_and_trains_one_expert_alone():
    from fedlt.models.experts import small_cnn_experts

    torch.manual_seed(0)
    model = small_cnn_experts(5, 1, num_experts=3).eval()
    x = torch.randn(4, 1, 28, 28)
    stack = model.expert_logits(x)
    for m in range(3):  # z_m alone equals row m of the stack; the expert as a model gives the same
        assert torch.allclose(model.expert_forward(x, m), stack[m], atol=1e-6)
        assert torch.allclose(model.expert_model(m)(x), stack[m], atol=1e-6)
    assert torch.allclose(model(x), stack.mean(0), atol=1e-6)
    model.train_only_expert(2)
    assert all(p.requires_grad for p in model.stem.parameters())
    trainable = [any(p.requires_grad for p in e.parameters()) for e in model.experts]
    assert trainable == [False, False, True]
    model.expert_forward(x, 2).sum().backward()
    assert all(p.grad is None for e in model.experts[:2] for p in e.parameters())
    assert all(p.grad is not None for p in model.stem.parameters())
    model.train_only_expert(None)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("n,bs,steps", [(9, 4, 2), (10, 4, 3), (8, 4, 2), (1, 4, 0), (129, 128, 1)])
def test_one_epoch_is_one_pass_when_the_last_batch_of_one_is_dropped(n, bs, steps):
    """n mod B = 1: the dropped batch of one is not made up from the next epoch's order (9 samples at batch 4
    trained 12 images in 3 steps, the third from a fresh permutation)."""
    from fedlt.train import epoch_steps, steps_per_epoch

    data = TensorData(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n) % 2, torch.zeros(1),
                      torch.ones(1), 2)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    r = train(m, data, opt=OptimConfig(batch_size=bs), epochs=1.0, generator=torch.Generator().manual_seed(0))
    assert r.steps == steps == epoch_steps(n, bs, 1.0) and r.num_examples == min(n, steps * bs)
    assert steps_per_epoch(n, bs) == max(1, steps)


def test_crop_pads_the_normalised_batch_with_black_as_torchvision_before_normalize():
    """RandomCrop(32, padding=4) pads the raw image with pixel 0 before Normalize: on the normalised batch the
    padding is (0 − mean)/std, not 0 (the mean colour). Each crop equals the torchvision pipeline's crop of the raw
    image at the same offset, normalised."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(1, 256, (64, 3, 6, 6), generator=g, dtype=torch.uint8)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.20, 0.20, 0.20])
    data = TensorData(raw, torch.zeros(64, dtype=torch.long), mean, std, 2)
    x, _ = prepare_batch(data, torch.arange(64), Augment(2, False, mean, std), torch.Generator().manual_seed(1))
    padded = normalize(torch.nn.functional.pad(raw, (2, 2, 2, 2)), mean, std)  # black pixels, then normalised
    for i in range(64):
        assert any(torch.equal(x[i], padded[i, :, dy:dy + 6, dx:dx + 6]) for dy in range(5) for dx in range(5)), i
    corner = x[:, :, 0, 0][(x[:, :, 0, 0] - (-mean / std)).abs().sum(1) == 0]
    assert len(corner) > 5  # some crops start in the padding: their corner is black, (0 − mean)/std
    assert not torch.isclose(x, torch.zeros(())).any()  # no pixel is the mean colour 0 (raw pixels are ≥ 1)


@pytest.mark.parametrize("epochs,steps", [(0.25, 1), (0.2, 0), (0.75, 2), (1.25, 3), (2.25, 5)])
def test_fractional_epochs_round_half_a_step_up(epochs, steps):
    """40 images at batch 32: 2 steps an epoch; 0.25 epochs is half a step and trains one (round-half-to-even gave
    0, and check_steps refused 0.25 while telling to give at least 0.25; 1.25 epochs gave 2 steps, 0.75 gave 2)."""
    from fedlt.train import epoch_steps

    assert epoch_steps(40, 32, epochs) == steps
    data = TensorData(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(40) % 2, torch.zeros(1),
                      torch.ones(1), 2)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    assert train(m, data, opt=OptimConfig(batch_size=32), epochs=epochs, generator=torch.Generator()).steps == steps


def test_gbme_expert_step_runs_the_frozen_experts_for_their_batchnorm_statistics():
    """``expert_forward(x, m, run_others=True)`` in training mode, as the GBME release's expert phase (the whole
    model's forward, one expert trained): the frozen experts' BatchNorm statistics follow the batch, their
    weights get no gradient, and z_m and its gradients are those of expert m alone."""
    import copy

    from fedlt.models.experts import resnet8_experts

    torch.manual_seed(0)
    model = resnet8_experts(5, 3, num_experts=3).train()
    model.train_only_expert(1)
    plain = copy.deepcopy(model)
    x = torch.randn(6, 3, 16, 16)

    def running_means(m):
        return {i: torch.cat([b.flatten() for n, b in m.experts[i].named_buffers() if n.endswith("running_mean")])
                for i in range(3)}

    before = running_means(model)
    z, z_plain = model.expert_forward(x, 1, run_others=True), plain.expert_forward(x, 1)
    torch.testing.assert_close(z, z_plain)
    after, after_plain = running_means(model), running_means(plain)
    assert all(not torch.equal(after[i], before[i]) for i in range(3))  # every expert's statistics moved
    assert torch.equal(after_plain[0], before[0]) and torch.equal(after_plain[2], before[2])  # not run
    z.sum().backward()
    z_plain.sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
