"""How far CReFF's federated features are from real ones, for finished CReFF runs (run by hand, CPU):

    .venv/bin/python benchmarks/creff_features.py runs/fed_table/fmnist-seed*-fed-creff

For each run, on its final FedAvg backbone (checkpoint.pt): test accuracy (overall / many / medium / few) of
  - the FedAvg classifier;
  - a fresh Linear re-trained on the run's federated features (what CReFF evaluates; ``crt_epochs``, ``crt_lr``);
  - the same re-training on real features of ``--per-class`` training images per class (an oracle cRT that a
    federated server cannot run: it bounds what better federated features could give);
and the features' relative distance from their N(0, 1) initialisation and mean norms (federated vs real).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlt.config import load_config  # noqa: E402
from fedlt.evaluation import evaluate_model  # noqa: E402
from fedlt.experiment import experiment_for, model_for  # noqa: E402
from fedlt.streams import Stream, torch_generator  # noqa: E402
from fedlt.train import normalize  # noqa: E402
from strategies.ccvr import fit_classifier  # noqa: E402


def scores(model: nn.Module, classifier: nn.Module, exp) -> str:
    m = copy.deepcopy(model)
    m.classifier = classifier
    r = evaluate_model(m, exp.tensor_data("test"), exp.train_counts)
    return f"{100 * r['accuracy']:.1f} ({100 * r['many']:.1f} / {100 * r['medium']:.1f} / {100 * r['few']:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--per-class", type=int, default=50)
    args = ap.parse_args()
    for run in args.runs:
        cfg = load_config(run / "config.yaml")
        o = cfg.strategy
        exp = experiment_for(cfg)
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        model = model_for(cfg, exp)
        model.load_state_dict(ckpt["state"]["model"])
        model.eval()
        feats = ckpt["state"]["strategy"]["creff_features"]
        C, n, d = feats.shape
        init = torch.randn(C, n, d, generator=torch_generator(cfg.seed, Stream.CREFF, 0))
        train = exp.tensor_data("train")
        idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:args.per_class] for c in range(C)])
        with torch.no_grad():
            real = model.features(normalize(train.images[idx], train.mean, train.std)).float()

        def retrain(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
            return fit_classifier(nn.Linear(d, C), x, y, int(o["crt_epochs"]), float(o["crt_lr"]), int(o["crt_batch"]),
                                  torch.Generator().manual_seed(0))

        federated = retrain(feats.reshape(-1, d), torch.arange(C).repeat_interleave(n))
        print(f"{run.name}: FedAvg classifier {scores(model, model.classifier, exp)} | on federated features "
              f"{scores(model, federated, exp)} | on {args.per_class} real features/class "
              f"{scores(model, retrain(real, train.labels[idx]), exp)}")
        moved = float((feats - init).norm() / init.norm())
        print(f"  federated features: ‖F − F0‖/‖F0‖ = {moved:.3f}, mean norm "
              f"{float(feats.norm(dim=2).mean()):.1f}; real features: mean norm {float(real.norm(dim=1).mean()):.1f}",
              flush=True)


if __name__ == "__main__":
    main()
