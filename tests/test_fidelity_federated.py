"""fedlt's federated methods against transcriptions of their official arithmetic (hand-made or random inputs):
CReFF (shangxinyi/CReFF-FL: Model/Resnet8.py, Dataset/param_aug.py, Dataset/Gradient_matching_loss.py,
main.py) and FedLC's default τ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlt.config import load_config
from fedlt.data import dsa
from fedlt.models import build_model


# --------------------------------------------------------------------------- CReFF's ResNet_cifar(8, scaling=4)
def official_resnet8_x4_forward(m, x):
    """Transcription of ``ResNet_cifar.forward`` (resnet_size=8, scaling=4, BasicBlock, 1×1 conv + BN
    downsample where the shape changes, AvgPool2d(8)) on fedlt's parameters, in eval mode."""
    stem_conv, stem_bn = m.features[0], m.features[1]

    def bn(layer, t):
        return F.batch_norm(t, layer.running_mean, layer.running_var, layer.weight, layer.bias, False)

    x = F.relu(bn(stem_bn, F.conv2d(x, stem_conv.weight, padding=1)))
    for stage, stride in ((m.features[3], 1), (m.features[4], 2), (m.features[5], 2)):
        blk = stage[0]
        out = F.relu(bn(blk.bn1, F.conv2d(x, blk.conv1.weight, stride=stride, padding=1)))
        out = bn(blk.bn2, F.conv2d(out, blk.conv2.weight, padding=1))
        if stride != 1 or x.shape[1] != out.shape[1]:
            residual = bn(blk.downsample[1], F.conv2d(x, blk.downsample[0].weight, stride=stride))
        else:
            residual = x
        x = F.relu(out + residual)
    feature = F.avg_pool2d(x, 8).flatten(1)
    return feature, F.linear(feature, m.classifier.weight, m.classifier.bias)


def test_resnet8_x4_is_creffs_model():
    torch.manual_seed(0)
    m = build_model("resnet8_x4", 10).eval()
    # parameter count of ResNet_cifar(resnet_size=8, scaling=4, num_classes=10), counted layer by layer
    convs = 3 * 64 * 9 + 64 * 64 * 9 * 2 + (64 * 128 * 9 + 128 * 128 * 9 + 64 * 128) + (
        128 * 256 * 9 + 256 * 256 * 9 + 128 * 256)
    bns = 2 * (64 + 64 * 2 + 128 * 3 + 256 * 3)
    assert sum(p.numel() for p in m.parameters()) == convs + bns + 256 * 10 + 10
    assert m.feature_dim == 256 and isinstance(m.classifier, torch.nn.Linear)
    for mod in m.modules():  # random BN statistics so the transcription checks them too
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5), mod.running_var.uniform_(0.5, 2), mod.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 3, 32, 32)
    feat, logits = official_resnet8_x4_forward(m, x)
    torch.testing.assert_close(m.features(x), feat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), logits, rtol=1e-5, atol=1e-5)
    # _weight_initialization: conv weights ~ N(0, 2/(k·k·out_channels))
    w = build_model("resnet8_x4", 10).features[5][0].conv2.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.05)


# --------------------------------------------------------------------------- DSA (param_aug.py), Siamese
P = dsa.DSAParams()


def off_color(x, b, s, c):
    x = x + (b - 0.5) * 1.0
    x_mean = x.mean(dim=1, keepdim=True)
    x = (x - x_mean) * (s * 2.0) + x_mean
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - x_mean) * (c + 0.5) + x_mean


def off_crop(x, tx, ty):
    translation_x = torch.full((x.size(0), 1, 1), tx)
    translation_y = torch.full((x.size(0), 1, 1), ty)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(x.size(2)),
                                                torch.arange(x.size(3)), indexing="ij")
    grid_x = torch.clamp(grid_x + translation_x + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def off_cutout(x, ox, oy):
    cutout_size = int(x.size(2) * 0.5 + 0.5), int(x.size(3) * 0.5 + 0.5)
    offset_x = torch.full((x.size(0), 1, 1), ox)
    offset_y = torch.full((x.size(0), 1, 1), oy)
    grid_batch, grid_x, grid_y = torch.meshgrid(torch.arange(x.size(0)), torch.arange(cutout_size[0]),
                                                torch.arange(cutout_size[1]), indexing="ij")
    grid_x = torch.clamp(grid_x + offset_x - cutout_size[0] // 2, min=0, max=x.size(2) - 1)
    grid_y = torch.clamp(grid_y + offset_y - cutout_size[1] // 2, min=0, max=x.size(3) - 1)
    mask = torch.ones(x.size(0), x.size(2), x.size(3), dtype=x.dtype)
    mask[grid_batch, grid_x, grid_y] = 0
    return x * mask.unsqueeze(1)


def off_affine(x, theta_one):
    theta = torch.stack([theta_one] * x.shape[0])  # Siamese: theta[:] = theta[0]
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def off_scale(x, sx, sy):
    return off_affine(x, torch.tensor([[sx, 0, 0], [0, sy, 0]], dtype=torch.float))


def off_rotate(x, r):
    theta = (r - 0.5) * 2 * 15.0 / 180 * float(np.pi)
    return off_affine(x, torch.tensor([[math.cos(theta), math.sin(-theta), 0], [math.sin(theta), math.cos(theta), 0]],
                                      dtype=torch.float))


@pytest.mark.parametrize("trial", range(4))
def test_dsa_ops_match_param_aug(trial):
    g = torch.Generator().manual_seed(trial)
    x = torch.randn(5, 3, 32, 32, generator=g)
    b, s, c = torch.rand(3, generator=g).tolist()
    torch.testing.assert_close(dsa.color(x, b, s, c), off_color(x, b, s, c))
    for tx, ty in ((-4, 4), (3, -2), (0, 0), (trial - 2, 1)):
        torch.testing.assert_close(dsa.crop(x, tx, ty), off_crop(x, tx, ty))
    for ox, oy in ((0, 0), (32, 32), (5, 17), (trial * 8, 31 - trial)):
        torch.testing.assert_close(dsa.cutout(x, ox, oy), off_cutout(x, ox, oy))
    r = 1.2
    sx, sy = (torch.rand(2, generator=g) * (r - 1 / r) + 1 / r).tolist()
    torch.testing.assert_close(dsa.affine(x, dsa.scale_theta(sx, sy)), off_scale(x, sx, sy))
    u = float(torch.rand((), generator=g))
    torch.testing.assert_close(dsa.affine(x, dsa.rotate_theta((u - 0.5) * 2 * 15 / 180 * math.pi)), off_rotate(x, u))


def test_siamese_dsa_one_family_one_parameter_set_per_batch():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, 32, 32)
    seen = set()
    for _ in range(200):
        out = dsa.siamese_dsa(img.expand(4, -1, -1, -1).clone(), g)
        assert torch.equal(out[0], out[3]) and torch.equal(out[1], out[2])  # the same op on every image
        seen.add(out.sum().item())
    assert len(seen) > 100  # fresh parameters on every call
    with pytest.raises(ValueError):
        dsa.siamese_dsa(img, g, families=("blur",))


# --------------------------------------------------------------------------- CReFF's matching distance
def official_match_loss(gw_syn, gw_real):
    """``match_loss`` with ``dis_metric='ours'``: Σ_params distance_wb (a 1-D bias reshaped to one row)."""
    dis = torch.tensor(0.0)
    for gwr, gws in zip(gw_real, gw_syn):
        if gwr.dim() == 1:
            gwr, gws = gwr.reshape(1, -1), gws.reshape(1, -1)
        dis += torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1)
                                                             + 0.000001))
    return dis


def test_gradient_distance_is_official_distance_wb():
    from strategies.creff import gradient_distance

    g = torch.Generator().manual_seed(1)
    gw, tw = torch.randn(10, 256, generator=g), torch.randn(10, 256, generator=g)
    gb, tb = torch.randn(10, generator=g), torch.randn(10, generator=g)
    torch.testing.assert_close(gradient_distance(gw, gb, tw, tb), official_match_loss([gw, gb], [tw, tb]))


# --------------------------------------------------------------------------- CReFF: round 1's fresh head
def test_creff_round_one_queries_a_fresh_linear_head(monkeypatch):
    """main.py: the gradient query and the matching of round 1 use ``temp_model = nn.Linear(256, 10)``, not
    the global model's classifier; later rounds use the previous round's re-trained classifier."""
    from fedlt.federation.records import to_arrays, to_state
    from strategies.creff import CReFF

    cfg = load_config(None, ["mode=federated", "strategy.name=creff", "strategy.num_features=2",
                             "strategy.match_steps=1", "strategy.crt_epochs=1", "partition.num_clients=2",
                             "federation.fraction=1.0"])
    strat = CReFF(cfg, 3)
    model = torch.nn.Module()
    model.classifier = torch.nn.Linear(8, 3)
    torch.nn.init.constant_(model.classifier.weight, 7.0)
    arrays = to_arrays({k: v for k, v in model.state_dict().items()})
    sent = []

    class Reply:
        content = {"grads": {"weight": torch.zeros(3, 3, 8, dtype=torch.float64),
                             "bias": torch.zeros(3, 3, dtype=torch.float64), "has": torch.ones(3, dtype=torch.float64)}}

    def fake_query(grid, cohort, arrs, kind, config, server_round):
        sent.append({k: v.clone() for k, v in to_state(arrs).items()})
        assert kind == "class-grads" and config["dsa"] is True
        return [Reply()]

    monkeypatch.setattr(strat, "query", fake_query)
    monkeypatch.setattr(strat, "cohort", lambda r: [0, 1])
    monkeypatch.setattr(strat.base, "run_round", lambda r, a, c, g: (a, None))
    strat.run_round(1, arrays, None, None)
    w1 = sent[0]["classifier.weight"]
    assert not torch.equal(w1, model.classifier.weight)  # not the global head
    assert w1.abs().max() <= 1 / math.sqrt(8)  # nn.Linear's default init U(±1/√d)
    retrained = strat.classifier["weight"].clone()
    strat.run_round(2, arrays, None, None)
    assert torch.equal(sent[1]["classifier.weight"], retrained)  # round 2: round 1's re-trained classifier
    assert not torch.equal(retrained, w1)


# --------------------------------------------------------------------------- GBME's model in its configs
@pytest.mark.parametrize("name, model, width", [("gbme_cifar10_lt", "resnet18_gn_experts", 512),
                                                ("gbme_cifar100_lt", "resnet32_experts", 48),
                                                ("grid_gbme", "resnet32_experts", 48)])
def test_gbme_configs_build_cosine_heads_with_scale_30(name, model, width):
    """main_fedavg.py's ResNet32Model / ResNet18GNModel(reduce_dimension=True, use_norm=True): per-expert
    NormedLinear, s = 30, on 48-d (ResNet-32, 24/48-channel expert stages) or 512-d (ResNet-18 GN) features; a
    part's own default holds when the config omits the key."""
    from pathlib import Path

    from fedlt.models.base import NormedLinear
    from fedlt.sweep import expand

    path = Path(__file__).resolve().parents[1] / "configs" / "federated" / f"{name}.yaml"
    for cfg, _ in expand(path):
        assert cfg.model.name == model
        net = build_model(cfg.model.name, 10, 3, **cfg.model.model_dump(exclude={"name"}))
        assert len(net.experts) == 3
        for expert in net.experts:
            assert isinstance(expert.classifier, NormedLinear) and expert.classifier.scale == 30.0
            assert expert.classifier.weight.shape == (width, 10)
    bare = load_config(None, ["mode=federated", "model.name=resnet32_experts", "strategy.name=gbme"])
    assert bare.model.classifier == "cosine" and bare.model.scale == 30.0


@pytest.mark.parametrize("name, cutout", [("gbme_cifar10_lt", 0), ("gbme_cifar100_lt", 16)])
def test_gbme_configs_cut_out_as_their_loaders(name, cutout):
    """fedml_api/data_preprocessing/cifar100/data_loader.py appends Cutout(16) to the normalised training
    transform; the CIFAR-10 loader has that line commented out."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "federated" / f"{name}.yaml"
    assert load_config(str(path)).data.cutout == cutout
