"""GBME's multi-expert ResNet-18 (``resnet18_gn_experts``) against a transcription of the official arithmetic
(Spinozaaa/Federated-Long-tailed-Learning ``expert_resnet_cifar.py`` ``ResNet_GN`` / ``BasicBlock_GN``, its
``norm2d`` and ``group_normalization.py`` ``GroupNorm2d``, as ``main_fedavg.py --model resnet18_gn`` builds it),
its defaults, and one GBME federated run on it."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_federated_methods import CIFAR_JPEG, simulate, tiny_config
from torch import nn

from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.models import build_model
from fedlt.models.base import NormedLinear


# --------------------------------------------------------------------------- the transcription
class OfficialGroupNorm2d(nn.Module):
    """GroupNorm2d(planes, g) as the release computes it: the (b, c, h, w) input viewed as (1, b·c/g, g, h, w),
    F.batch_norm with batch statistics over each of the b·c/g "channels", an affine weight/bias of c/g entries
    repeated b times."""

    def __init__(self, planes: int, group: int) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.ones(planes // group))
        self.bias = nn.Parameter(torch.zeros(planes // group))

    def forward(self, x):
        b, c = x.shape[:2]
        out = F.batch_norm(x.contiguous().view(1, b * c // self.group, self.group, *x.shape[2:]), None, None,
                           self.weight.repeat(b), self.bias.repeat(b), training=True, momentum=0.1, eps=1e-5)
        return out.view(b, c, *x.shape[2:])


def official_norm2d(planes: int, group_norm: int) -> nn.Module:
    return OfficialGroupNorm2d(planes, group_norm) if group_norm > 0 else nn.BatchNorm2d(planes)


class OfficialBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, downsample=None, group_norm=0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = official_norm2d(planes, group_norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = official_norm2d(planes, group_norm)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class OfficialResNetGN(nn.Module):
    """ResNet_GN(BasicBlock_GN, [2, 2, 2, 2], num_experts, use_norm, group_norm): what its __init__ leaves
    after overwriting ResNet_s's modules, and its forward/_separate_part."""

    def __init__(self, num_experts: int, num_classes: int, use_norm: bool, group_norm: int) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = official_norm2d(64, group_norm)
        self.layer1 = self.make_layer(64, 2, 1)  # group_norm not passed: its default 0
        self.in_planes = 64
        self.layer2s = nn.ModuleList([self.make_layer(128, 2, 2, group_norm) for _ in range(num_experts)])
        self.in_planes = 128
        self.layer3s = nn.ModuleList([self.make_layer(256, 2, 2, group_norm) for _ in range(num_experts)])
        self.in_planes = 256
        self.layer4s = nn.ModuleList([self.make_layer(512, 2, 2, group_norm) for _ in range(num_experts)])
        if use_norm:
            self.linears = nn.ModuleList([OfficialNormedLinear(512, num_classes) for _ in range(num_experts)])
        else:
            self.linears = nn.ModuleList([nn.Linear(512, num_classes) for _ in range(num_experts)])
        self.s = 30 if use_norm else 1

    def make_layer(self, planes, num_blocks, stride=1, group_norm=0):
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.in_planes, planes, 1, stride, bias=False),
                                       official_norm2d(planes, group_norm))
        layers = [OfficialBlock(self.in_planes, planes, stride, downsample, group_norm)]
        layers += [OfficialBlock(planes, planes, group_norm=group_norm) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.layer1(F.relu(self.bn1(self.conv1(x))))
        outs = []
        for ind in range(len(self.layer2s)):
            o = self.layer4s[ind](self.layer3s[ind](self.layer2s[ind](out)))
            o = F.avg_pool2d(o, o.size()[3]).view(o.size(0), -1)
            outs.append(self.linears[ind](o) * self.s)
        return torch.stack(outs, dim=1).mean(dim=1), outs


class OfficialNormedLinear(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))

    def forward(self, x):
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


def official_key(key: str) -> str:
    """fedlt's state-dict key -> the release's (stem.0/1/3 = conv1/bn1/layer1; expert m's features.0/1/2 =
    layer2s/3s/4s[m], classifier = linears[m]; block-level names are the same)."""
    parts = key.split(".")
    if parts[0] == "stem":
        return ".".join([{"0": "conv1", "1": "bn1", "3": "layer1"}[parts[1]], *parts[2:]])
    m = parts[1]
    if parts[2] == "classifier":
        return ".".join(["linears", m, *parts[3:]])
    return ".".join([["layer2s", "layer3s", "layer4s"][int(parts[3])], m, *parts[4:]])


@pytest.mark.parametrize("group_norm, classifier", [(8, "cosine"), (0, "linear")])
def test_resnet18_gn_experts_computes_the_official_resnet_gn(group_norm, classifier):
    """Same parameters (count and names, every one mapped), and the same logits per expert and their mean on a
    random 32×32 batch, in train mode (batch statistics) and eval mode, for the release's --model resnet18_gn
    (GroupNorm, 8 channels per group; BatchNorm layer1) and --model resnet18 (group_norm=0) with linear heads."""
    torch.manual_seed(0)
    model = build_model("resnet18_gn_experts", 10, 3, num_experts=2, classifier=classifier, scale=30.0,
                        channels_per_group=group_norm)
    official = OfficialResNetGN(2, 10, use_norm=classifier == "cosine", group_norm=group_norm)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in official.parameters())
    if group_norm == 8:
        assert count == 22_189_968  # 157,392 shared + 2 × 11,016,288
    with torch.no_grad():  # random affine parameters, so a mis-mapped γ/β shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    x = torch.randn(6, 3, 32, 32)
    for train in (True, False):  # (each train-mode pass moves BatchNorm's running statistics: copy them again)
        official.load_state_dict({official_key(k): v for k, v in model.state_dict().items()}, strict=True)
        model.train(train)
        official.train(train)
        with torch.no_grad():
            mean, outs = official(x)
            torch.testing.assert_close(model.expert_logits(x), torch.stack(outs), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model(x), mean, rtol=1e-4, atol=1e-4)
            for m in range(2):
                torch.testing.assert_close(model.expert_forward(x, m), outs[m], rtol=1e-4, atol=1e-4)


def test_resnet18_gn_experts_defaults_hold_unless_set():
    """Cosine heads with s = 30 and GroupNorm of 8 channels per group unless the config sets the keys."""
    cfg = load_config(None, ["mode=federated", "strategy.name=gbme", "model.name=resnet18_gn_experts"])
    assert (cfg.model.classifier, cfg.model.scale, cfg.model.num_experts, cfg.model.channels_per_group) == \
        ("cosine", 30.0, 3, 8)
    model = build_model(cfg.model.name, 10, 3, **cfg.model.model_dump(exclude={"name"}))
    assert all(isinstance(e.classifier, NormedLinear) and e.classifier.scale == 30.0 for e in model.experts)
    assert all(e.classifier.weight.shape == (512, 10) for e in model.experts)
    linear = load_config(None, ["model.name=resnet18_gn_experts", "model.classifier=linear"])
    model = build_model(linear.model.name, 10, 3, **linear.model.model_dump(exclude={"name"}))
    assert all(type(e.classifier) is nn.Linear for e in model.experts)
    with pytest.raises(FedLTError, match="model.channels_per_group") as err:
        load_config(None, ["model.name=resnet18_gn_experts", "model.channels_per_group=3"])
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def mini_lists(tmp_path_factory) -> Path:
    """32 training images (4, 4, 4, 4, 3, 3, 3, 3, 2, 2 of classes 0-9) and 2 test images per class: ResNet-18
    experts cost ~25x the small CNN's steps, so the tiny lists of test_federated_methods (159) would be slow."""
    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    root = tmp_path_factory.mktemp("mini")
    for split, per_class in (("train", lambda c: 4 - c // 4), ("test", lambda c: 2)):
        by = collections.defaultdict(list)
        for line in (CIFAR_JPEG / f"{split}.txt").read_text().splitlines():
            if line.strip():
                by[int(line.split()[-1])].append(line)
        (root / f"{split}.txt").write_text("\n".join(l for c in range(10) for l in by[c][:per_class(c)]) + "\n")
    return root


def test_gbme_runs_on_resnet18_gn_experts(mini_lists, tmp_path):
    """GBME's prior query and one joint round on the ResNet-18 experts (2 clients, 2 experts, batch 8); the
    expert phase runs on the same MultiExpertModel API in test_federated_methods.test_gbme_simulation."""
    cfg = tiny_config(mini_lists, "strategy.name=gbme", "model.name=resnet18_gn_experts", "model.num_experts=2",
                      "partition.num_clients=2", "federation.fraction=1.0", "train.local_steps=1",
                      "train.batch_size=8", "federation.rounds=1")
    summary, rows = simulate(cfg, tmp_path / "run")
    assert summary["client"] == "gbme" and len(rows) == 1
    assert sorted(k for g in summary["expert_groups"] for k in g) == [0, 1]
    assert np.asarray(summary["pi_hat"]).shape == (10,)
    assert len(summary["expert_accuracy"]) == 2 and all(0 <= a <= 1 for a in summary["expert_accuracy"])
    assert sorted(rows[0]["clients"]) == [0, 1]  # the joint phase: one cohort of both clients
