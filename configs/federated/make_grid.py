"""Write configs/federated/grid/: CIFAR-10/100-LT × IF ∈ {100, 50} × α ∈ {0.5, 1.0} × every federated method,
on the FedLoGe / Fed-GraB protocol family (METHODS.md §3.8: 40 clients, 8 per round, T=500, E=5, lr 0.03
m0.5). Local batch 32 (the family uses 5-10). ResNet-18 for both data sets (ResNet-34 is not in fedlt);
GBME uses its own ResNet-32 ×3 experts. Run: python configs/federated/make_grid.py"""

from pathlib import Path

import yaml

METHODS = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.01},
    "fedavgm": {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.9},
    "fedlc": {"name": "fedlc", "tau": 0.5},
    "gbme": {"name": "gbme", "joint_fraction": 0.6, "beta_g": 0.8},
    "creff": {"name": "creff", "base": "fedavg"},
    "ccvr": {"name": "ccvr", "base": "fedavg", "num_virtual": 200},
    "posthoc": {"name": "posthoc_calibration", "base": "fedavg", "tau": 1.0},
    "bs_local": {"name": "fedavg"},  # FedAvg with Balanced Softmax on each client's local prior
}


def config(data: str, imbalance: int, alpha: float, method: str) -> dict:
    gbme = method == "gbme"
    cfg = {
        "name": f"{data}-if{imbalance}-a{alpha}-{method}", "seed": 0, "mode": "federated",
        "data": {"name": data, "imbalance_factor": imbalance},
        "partition": {"method": "dirichlet", "num_clients": 40, "alpha": alpha},
        "model": {"name": "resnet32_experts", "classifier": "cosine", "scale": 30.0} if gbme else {"name": "resnet18"},
        "train": {"local_epochs": 5, "lr": 0.03, "momentum": 0.5, "weight_decay": 5.0e-4, "batch_size": 32},
        "federation": {"rounds": 500, "fraction": 0.2},
        "strategy": dict(METHODS[method]),
    }
    if method == "bs_local":
        cfg["client"] = {"name": "local_loss", "loss": "balanced_softmax"}
    return cfg


def main() -> None:
    out = Path(__file__).parent / "grid"
    out.mkdir(exist_ok=True)
    for data in ("cifar10", "cifar100"):
        for imbalance in (100, 50):
            for alpha in (0.5, 1.0):
                for method in METHODS:
                    cfg = config(data, imbalance, alpha, method)
                    (out / f"{cfg['name']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


if __name__ == "__main__":
    main()
