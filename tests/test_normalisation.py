"""``data.mean`` / ``data.std``: the normalisation constants of a run (default: the data set's own statistics),
and the official constants each shipped CIFAR config gives."""

import pytest
import torch
from test_bad_input import refused
from torch import nn

from conftest import ROOT
from fedlt.config import load_config
from fedlt.experiment import experiment_for
from fedlt.sweep import expand
from fedlt.train import predict_logits

# The constants as the official code writes them.
LDAM = ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])  # kaidic/LDAM-DRW cifar_train.py and most CIFAR-LT code
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # FedLoGe's / Fed-GraB's util/dataset.py on CIFAR-10
CIFAR10_FULL = ([0.49139968, 0.48215827, 0.44653124], [0.24703233, 0.24348505, 0.26158768])  # GBME, GLMC
DATASET = (None, None)  # the data set's own statistics (fedlt/data/catalog.py)

OFFICIAL = {
    "centralized/cifar_lt.yaml": LDAM,  # LDAM-DRW cifar_train.py
    "centralized/cifar_lt_decoupled.yaml": LDAM,  # stage 1 is cifar_lt.yaml's
    "centralized/cifar_lt_area.yaml": LDAM,  # AREA_cifar.py
    "centralized/cifar_lt_cc_sam.yaml": LDAM,  # CC-SAM datasets/Cifar.py
    "centralized/cifar100_lt_cc_sam.yaml": LDAM,
    "centralized/cifar10_lt_balpoe.yaml": LDAM,  # BalPoE dataset/others.py cifar_aug_plus
    "centralized/cifar100_lt_balpoe.yaml": LDAM,
    "centralized/cifar_lt_eql.yaml": LDAM,  # the LDAM-DRW recipe (eql.detectron2 has no CIFAR code)
    "centralized/cifar_lt_seql.yaml": LDAM,  # BagofTricks-LT lib/dataset/cao_cifar.py
    "centralized/cifar_lt_mdcs.yaml": LDAM,  # MDCS data_loader/cifar_data_loaders.py
    "centralized/cifar_lt_ncl.yaml": LDAM,  # NCL lib/dataset/cui_cifar.py
    "centralized/cifar_lt_sbcl.yaml": LDAM,  # SBCL SimCLR/main.py, linear_classify.py
    "centralized/cifar_lt_shike.yaml": LDAM,  # SHIKE cifarTrain.py
    "centralized/cifar_lt_ssp.yaml": LDAM,  # imbalanced-semi-self pretrain_rot.py, train.py
    "centralized/cifar_lt_tde.yaml": LDAM,  # Long-Tailed-Recognition.pytorch classification/data/ImbalanceCIFAR.py
    "centralized/cifar100_lt_tde.yaml": LDAM,
    "centralized/cifar_lt_tlc.yaml": LDAM,  # TLC data_loader/cifar_data_loaders.py
    "centralized/cifar100_lt_tlc.yaml": LDAM,
    "centralized/cifar_lt_glmc.yaml": CIFAR10_FULL,  # GLMC-2023/utils/util.py (CIFAR-10)
    "centralized/cifar_lt_lfme.yaml": DATASET,  # LFME released ImageNet-LT code only
    **{f"centralized/mislas/cifar{c}_lt_if{b}_mislas.yaml": LDAM for c in (10, 100) for b in (10, 50, 100)},
    "federated/creff_cifar10_lt.yaml": LDAM,  # CReFF-FL main.py
    "federated/gbme_cifar10_lt.yaml": CIFAR10_FULL,  # fedml_api/data_preprocessing/cifar10/data_loader.py
    "federated/gbme_cifar100_lt.yaml": DATASET,  # cifar100/data_loader.py: fedlt's CIFAR-100 constants exactly
    "federated/fedloge_cifar10_lt.yaml": IMAGENET,
    "federated/fedgrab_cifar10_lt.yaml": IMAGENET,
    "federated/fedetf_cifar10_lt.yaml": IMAGENET,  # FedLoGe's run of FedETF (FedETF's own repository: 0.5, 0.5)
    "federated/fedrod_cifar10_lt.yaml": IMAGENET,  # FedLoGe's baselines/fedrod_aggre.py
    "federated/fedbabu_cifar10_lt.yaml": IMAGENET,  # FedLoGe's baselines/fedbabu_ltspar.py
}


def cifar_configs() -> list[str]:
    """Every shipped config that runs a CIFAR data set (in any run of its sweep), relative to configs/."""
    out = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if any(c.data.name.startswith("cifar") for c, _ in expand(str(path))):
            out.append(str(path.relative_to(ROOT / "configs")))
    return out


# fedlt's own comparison configs: one normalisation for the federated and the centralized runs they compare
OWN_PROTOCOL = {"cifar10_lt.yaml", "cifar100_lt.yaml", "cifar10_jpeg_lt.yaml", "cifar10_jpeg_lt_cpu.yaml",
                "federated/grid.yaml", "federated/grid_bs_local.yaml", "federated/grid_gbme.yaml"}


def test_every_cifar_config_is_in_the_table():
    assert set(cifar_configs()) == set(OFFICIAL) | OWN_PROTOCOL


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_cifar_configs_normalise_as_their_official_code(name):
    mean, std = OFFICIAL[name]
    for cfg, _ in expand(str(ROOT / "configs" / name)):
        assert (cfg.data.mean, cfg.data.std) == (mean, std), (name, cfg.data.name)


@pytest.mark.parametrize("name", sorted(OWN_PROTOCOL))
def test_own_protocols_use_the_data_sets_statistics(name):
    assert all((c.data.mean, c.data.std) == DATASET for c, _ in expand(str(ROOT / "configs" / name)))


def test_given_constants_reach_every_normalised_batch():
    """x = (pixel/255 − mean)/std with the given constants; the default stays the data set's (0.2860, 0.3530)."""
    default = experiment_for(load_config(None, []))
    assert default.mean.tolist() == pytest.approx([0.2860]) and default.std.tolist() == pytest.approx([0.3530])
    exp = experiment_for(load_config(None, ["data.mean=[0.25]", "data.std=[0.5]"]))
    data = exp.tensor_data("test", indices=range(4))
    seen = predict_logits(nn.Flatten(), data)  # the identity model: the normalised images themselves
    torch.testing.assert_close(seen, (data.images.flatten(1).float() / 255 - 0.25) / 0.5)


@pytest.mark.parametrize("given, error", [
    (["data.mean=[0.1, 0.2, 0.3]"], "error: data.mean has 3 values, fashion_mnist's images have 1 channel(s): "
                                    "give one per channel"),
    (["data.std=[0.0]"], "data.std.0"),
    (["data.mean=[]"], "data.mean"),
])
def test_bad_constants_are_refused_in_one_line_before_training(capsys, tmp_path, given, error):
    assert error in refused(capsys, tmp_path, *given)
