"""fedlt's models against transcriptions of the official ones: kaidic/LDAM-DRW ``models/resnet_cifar.py``
(``ResNet_s``, option-A shortcuts, ``NormedLinear``), emasa/BalPoE-CalibratedLT and Spinozaaa/Federated-Long-
tailed-Learning ``ldam_drw_resnets/expert_resnet_cifar.py`` (``ResNet_s`` with per-expert layer2/layer3) and
ZackZikaiXiao/FedLoGe ``model/model_res.py`` (``ResNet18``, the CIFAR form that FedLoGe's, FedROD's, FedBABU's and
Fed-GraB's releases build). Each transcription gets fedlt's parameters in its own state-dict order (the shapes must
agree one by one, so the layer lists and parameter counts are the official ones) and must give the same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.config import load_config
from fedlt.models import build_model
from fedlt.models.experts import resnet32_experts


class OfficialNormedLinear(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5))

    def forward(self, x):
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class OfficialBlock(nn.Module):
    """LDAM-DRW's ``BasicBlock`` (``pad``: ``planes // 4`` in LDAM-DRW, ``(planes - in_planes) // 2`` in the
    expert files; the same for doubled widths), or FedLoGe's (``option='B'``: 1×1 conv + BN)."""

    def __init__(self, in_planes, planes, stride=1, option="A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        self.pad = None
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.pad = (planes - in_planes) // 2
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad is not None
                     else self.shortcut(x))
        return F.relu(out)


def make_layer(in_planes, planes, blocks, stride, option="A"):
    return nn.Sequential(*[OfficialBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, option)
                           for i in range(blocks)])


class OfficialResNetS(nn.Module):
    """LDAM-DRW ``ResNet_s(BasicBlock, [n, n, n], num_classes, use_norm)``."""

    def __init__(self, n, num_classes, use_norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, self.layer2 = make_layer(16, 16, n, 1), make_layer(16, 32, n, 2)
        self.layer3 = make_layer(32, 64, n, 2)
        self.linear = OfficialNormedLinear(64, num_classes) if use_norm else nn.Linear(64, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.linear(F.avg_pool2d(out, out.size()[3]).view(out.size(0), -1))


class OfficialExpertResNetS(nn.Module):
    """The expert ``ResNet_s(BasicBlock, [5, 5, 5], num_experts, num_classes, reduce_dimension, use_norm, s=30)``:
    shared conv1/bn1/layer1, per-expert layer2s/layer3s/linears; output the mean of the experts' logits."""

    def __init__(self, num_experts, num_classes, reduce_dimension, use_norm):
        super().__init__()
        w2, w3 = (24, 48) if reduce_dimension else (32, 64)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = make_layer(16, 16, 5, 1)
        self.layer2s = nn.ModuleList([make_layer(16, w2, 5, 2) for _ in range(num_experts)])
        self.layer3s = nn.ModuleList([make_layer(w2, w3, 5, 2) for _ in range(num_experts)])
        self.linears = nn.ModuleList([OfficialNormedLinear(w3, num_classes) if use_norm else nn.Linear(w3, num_classes)
                                      for _ in range(num_experts)])
        self.s = 30 if use_norm else 1

    def forward(self, x):
        out = self.layer1(F.relu(self.bn1(self.conv1(x))))
        outs = []
        for l2, l3, lin in zip(self.layer2s, self.layer3s, self.linears):
            o = l3(l2(out))
            outs.append(lin(F.avg_pool2d(o, o.size()[3]).view(o.size(0), -1)) * self.s)
        return torch.stack(outs, dim=1).mean(dim=1)


class OfficialResNet18Cifar(nn.Module):
    """FedLoGe / Fed-GraB ``model/model_res.py`` ``ResNet(BasicBlock, [2, 2, 2, 2])``, less its ``projection``
    Linear(512, 512), which ``forward`` never calls."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2 = make_layer(64, 64, 2, 1, "B"), make_layer(64, 128, 2, 2, "B")
        self.layer3, self.layer4 = make_layer(128, 256, 2, 2, "B"), make_layer(256, 512, 2, 2, "B")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


class OfficialBBNResNetCifar(nn.Module):
    """KaihuaTang/Long-Tailed-Recognition.pytorch ``classification/models/ResNet32Feature.py``
    ``BBN_ResNet_Cifar(BasicBlock, [5, 5, 5])`` (TDE's CIFAR backbone): layer3 of 4 blocks, then ``cb_block`` and
    ``rb_block`` on the same maps, concatenated, average-pooled: the 128-d features (no classifier)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, self.layer2 = make_layer(16, 16, 5, 1), make_layer(16, 32, 5, 2)
        self.layer3 = make_layer(32, 64, 5 - 1, 2)
        self.cb_block, self.rb_block = OfficialBlock(64, 64), OfficialBlock(64, 64)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        out = torch.cat((self.cb_block(out), self.rb_block(out)), dim=1)
        return self.avgpool(out).view(out.shape[0], -1)


def load_in_order(official: nn.Module, ours_state: dict) -> None:
    """Give ``official`` fedlt's tensors, matched in state-dict order; every shape must agree."""
    keys = list(official.state_dict())
    values = list(ours_state.values())
    assert [tuple(official.state_dict()[k].shape) for k in keys] == [tuple(v.shape) for v in values]
    official.load_state_dict(dict(zip(keys, values)))


def randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("depth,use_norm,count", [(32, False, 464_154), (32, True, 464_144), (20, False, 269_722)])
def test_cifar_resnet_is_ldam_drws_resnet_s(depth, use_norm, count):
    torch.manual_seed(0)
    ours = build_model(f"resnet{depth}", 10, classifier="cosine" if use_norm else "linear").eval()
    official = OfficialResNetS((depth - 2) // 6, 10, use_norm).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in official.parameters()) == count
    randomise_bn(ours)
    load_in_order(official, ours.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reduce_dimension,use_norm", [(True, True), (False, True), (False, False)])
def test_resnet32_experts_is_the_expert_resnet_s(reduce_dimension, use_norm):
    """GBME's default (reduce_dimension, cosine ×30: 24/48 channels) and BalPoE's (32/64 channels)."""
    torch.manual_seed(0)
    widths = (16, 24, 48) if reduce_dimension else (16, 32, 64)
    ours = resnet32_experts(10, widths=widths, classifier="cosine" if use_norm else "linear",
                            scale=30.0 if use_norm else 1.0).eval()
    official = OfficialExpertResNetS(3, 10, reduce_dimension, use_norm).eval()
    randomise_bn(ours)
    state = ours.state_dict()
    stem = {k: v for k, v in state.items() if k.startswith("stem.")}
    per_expert = [[(k, v) for k, v in state.items() if k.startswith(f"experts.{m}.")] for m in range(3)]
    ordered = dict(stem)
    for part in ("features.0.", "features.1.", "classifier."):  # layer2s, then layer3s, then linears
        for m in range(3):
            ordered.update((k, v) for k, v in per_expert[m] if k.startswith(f"experts.{m}.{part}"))
    assert len(ordered) == len(state)
    load_in_order(official, ordered)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)


def test_resnet18_cifar_is_fedloges_model_res_resnet18():
    torch.manual_seed(0)
    ours = build_model("resnet18_cifar", 10).eval()
    official = OfficialResNet18Cifar(10).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in official.parameters()) == 11_173_962
    randomise_bn(ours)
    load_in_order(official, ours.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)


def test_resnet32_bbn_is_tdes_resnet32_feature():
    torch.manual_seed(0)
    ours = build_model("resnet32_bbn", 10).eval()
    official = OfficialBBNResNetCifar().eval()
    backbone = sum(p.numel() for p in ours.features.parameters())
    assert backbone == sum(p.numel() for p in official.parameters()) and ours.feature_dim == 128
    assert sum(p.numel() for p in ours.parameters()) == backbone + 128 * 10 + 10 == 538_778
    randomise_bn(ours)
    load_in_order(official, ours.features.state_dict())
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours.features(x), official(x), rtol=1e-4, atol=1e-4)
    conv = [m.weight for m in build_model("resnet32_bbn", 10).modules() if isinstance(m, nn.Conv2d)]
    assert conv[-1].std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.1)  # rb_block's conv2: kaiming


@pytest.mark.parametrize("path", ["fedrod_cifar10_lt", "fedbabu_cifar10_lt", "fedgrab_cifar10_lt",
                                  "fedloge_cifar10_lt"])
def test_cifar_protocols_of_the_fedloge_family_use_the_cifar_resnet18(path):
    """These releases build model/model_res.py's ResNet-18 (3×3 stem, no max-pool), not torchvision's ImageNet
    stem, which shrinks a 32×32 image to 2×2 maps at layer4's input (1×1 at its output)."""
    cfg = load_config(f"configs/federated/{path}.yaml")
    assert cfg.model.name == "resnet18_cifar"


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnet_grayscale_stem_is_initialised_as_torchvision(name):
    """in_channels != 3 replaces conv1; torchvision draws every conv N(0, 2/(k²·out)) (kaiming, fan-out), not
    PyTorch's default uniform(±1/√fan_in) (std 0.082 for a 7×7 grayscale stem, against 0.025)."""
    torch.manual_seed(0)
    w = build_model(name, 10, 1).features[0].conv1.weight
    assert w.shape == (64, 1, 7, 7)
    assert w.std().item() == pytest.approx((2 / (49 * 64)) ** 0.5, rel=0.1)
