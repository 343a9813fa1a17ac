"""Global-prior estimators side by side on Fashion-MNIST-LT (IF = 100; the default config's data, model, lr).

Config: fedlt's defaults (Fashion-MNIST-LT IF = 100, small_cnn, SGD lr 0.05 m 0.9, batch 64, every client
every round) with partition.alpha and partition.num_clients set. Run by hand (not in CI), from the repository root:

    nice -n 10 .venv/bin/python benchmarks/prior_estimators.py [--seeds 0 1 2] [--settings 0.5:10 ...]
        [--rounds 16] [--posthoc-settings α:K ...] [--gbme-settings α:K ...] [--gbme-keys KEY=VALUE ...]
        [--min-size N] [--out DIR]
    nice -n 10 .venv/bin/python benchmarks/prior_estimators.py --noise-only 300   # dp_counts vs dp_counts_agm

(1) error of each estimate (``strategy.prior`` = gbme, dpa, dp_counts and dp_counts_agm at ε = 1, δ = 1e-5;
    :mod:`strategies.global_prior`)
    for α ∈ {0.1, 0.5, 1.0} × K ∈ {10, 100} clients: L1, KL(π‖π̂) and the mean relative error
    |π̂_c − π_c| / π_c over the few-shot classes (fedlt.metrics.class_groups), mean over ``--seeds``. Each
    estimate is computed exactly as a run's set-up computes it: the clients' one-epoch query from the seed's
    θ0 with the client generator of round 0 (the same numbers a run with that seed gets).
(2) accuracy each estimate gives post-hoc calibration: one FedAvg run per setting of ``--posthoc-settings``
    (default: every setting; first seed, in process),
    its final model's test logits calibrated z − log π̂ with each estimate (what ``strategy.name=
    posthoc_calibration strategy.prior=X`` reports, since the base trains the same whatever X);
(3) accuracy each estimate gives GBME (``model.name=small_cnn_experts``), one in-process run per estimator for
    the settings in ``--gbme-settings`` (α:K), first seed.
Writes Markdown tables and the raw numbers to ``--out`` after every setting (one thread: run it beside others).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clients  # noqa: E402,F401  (registers the client methods)
import strategies  # noqa: E402,F401  (registers the strategies and queries)
from fedlt.config import load_config  # noqa: E402
from fedlt.errors import FedLTError  # noqa: E402
from fedlt.experiment import augment_for, experiment_for, model_for  # noqa: E402
from fedlt.federation.inprocess import run_inprocess  # noqa: E402
from fedlt.federation.queries import QUERIES  # noqa: E402
from fedlt.federation.strategy import round_lr  # noqa: E402
from fedlt.metrics import class_groups, evaluate_logits  # noqa: E402
from fedlt.streams import Stream, torch_generator  # noqa: E402
from fedlt.train import predict_logits  # noqa: E402
from strategies.gbme.prior import classifier_weight_dc, estimate_prior  # noqa: E402
from strategies.global_prior import (  # noqa: E402
    analytic_gaussian_sigma,
    dp_counts_estimate,
    dpa_estimate,
    gaussian_sigma,
    oracle_estimate,
    prior_errors,
)
from strategies.posthoc_calibration import calibrate  # noqa: E402

ALPHAS, CLIENTS_K = (0.1, 0.5, 1.0), (10, 100)
ESTIMATORS = ("gbme", "dpa", "dp_counts", "dp_counts_agm", "oracle")


MIN_SIZE: list[str] = []  # ["partition.min_size=N"] from --min-size


def parse_setting(setting: str) -> tuple[float, int]:
    """``α:K`` (e.g. ``0.5:10``) as (α, K)."""
    alpha, k = setting.split(":")
    return float(alpha), int(k)


def config(alpha: float, k: int, seed: int, rounds: int, *extra: str):
    return load_config(None, [f"seed={seed}", "mode=federated", f"partition.alpha={alpha}",
                              f"partition.num_clients={k}", f"federation.rounds={rounds}",
                              f"eval.every={rounds}", *MIN_SIZE, *extra])


def estimates(cfg, epsilon: float = 1.0, delta: float = 1e-5) -> dict:
    """Every estimator's π̂ for ``cfg`` as its run's set-up computes it."""
    exp = experiment_for(cfg)
    model0 = model_for(cfg, exp)
    w0 = classifier_weight_dc(model0)
    sigmas = {"dp_counts": gaussian_sigma(epsilon, delta), "dp_counts_agm": analytic_gaussian_sigma(epsilon, delta)}
    weights, sizes, noisy = [], [], {name: [] for name in sigmas}
    for pid in range(cfg.partition.num_clients):
        data = exp.client_data(pid)
        model = model_for(cfg, exp)
        gen = torch_generator(cfg.seed, Stream.CLIENT, 0, pid)
        r = QUERIES.get("prior-epoch")(cfg, model, data, {"lr": round_lr(cfg, 1)}, gen, augment_for(cfg, data))
        weights.append(r.extra_arrays["classifier"]["weight"])
        sizes.append(len(data))
        for name, sigma in sigmas.items():
            gen = torch_generator(cfg.seed, Stream.CLIENT, 0, pid)
            noisy[name].append(np.asarray(QUERIES.get("noisy-counts")(cfg, model, data, {"sigma": sigma}, gen,
                                                                     augment_for(cfg, data)).metrics["noisy-counts"]))
    return {"gbme": estimate_prior(w0, weights, sizes).pi_hat, "dpa": dpa_estimate(w0, weights, sizes).pi_hat,
            **{name: dp_counts_estimate(noisy[name]).pi_hat for name in sigmas}, "oracle": oracle_estimate(cfg).pi_hat}


def final_logits(cfg, run: Path) -> torch.Tensor:
    exp = experiment_for(cfg)
    model = model_for(cfg, exp)
    state = torch.load(run / "checkpoint.pt", weights_only=True)["state"]["model"]
    model.load_state_dict(state)
    return predict_logits(model, exp.tensor_data("test"), 1024)


def posthoc_row(alpha: float, k: int, seed: int, rounds: int, pis: dict) -> dict:
    """Test metrics of one FedAvg run's final model, uncalibrated and calibrated with each estimate."""
    cfg = config(alpha, k, seed, rounds)
    with tempfile.TemporaryDirectory() as tmp:
        run_inprocess(cfg, tmp)
        logits = final_logits(cfg, Path(tmp))
    exp = experiment_for(cfg)
    labels = exp.tensor_data("test").labels
    row = {"uncalibrated": evaluate_logits(logits, labels, exp.train_counts)}
    for e in ESTIMATORS:
        row[e] = evaluate_logits(calibrate(logits, pis[e]), labels, exp.train_counts)
    return {n: {"accuracy": m["accuracy"], "few": m["few"]} for n, m in row.items()}


def gbme_configs(alpha: float, k: int, seed: int, rounds: int, keys: tuple[str, ...] = ()) -> dict:
    """GBME's run config with each estimator's prior; ``keys``: config overrides of these runs (e.g.
    model.classifier=linear)."""
    return {e: config(alpha, k, seed, rounds, "strategy.name=gbme", "model.name=small_cnn_experts",
                      f"strategy.prior={e}", *keys) for e in ESTIMATORS}


def gbme_row(alpha: float, k: int, seed: int, rounds: int, keys: tuple[str, ...] = ()) -> dict:
    """GBME's accuracy with each estimator's prior (:func:`gbme_configs`)."""
    row = {}
    for e, cfg in gbme_configs(alpha, k, seed, rounds, keys).items():
        with tempfile.TemporaryDirectory() as tmp:
            s = run_inprocess(cfg, tmp)
        row[e] = {"accuracy": s["accuracy"], "few": s["few"], "prior_l1": s["prior_l1"]}
    return row


def noise_only(settings: list[str], draws: int, min_size_01_100: int = 2) -> list[str]:
    """dp_counts against dp_counts_agm over ``draws`` noise draws per setting (no training: the noisy-count
    estimate reads only the partition's counts), with partition.min_size=2 where α=0.1, K=100 needs it."""
    lines = ["| α | K | estimator | σ | L1 | KL(π‖π̂) | few-shot rel. err |", "|---|---|---|---|---|---|---|"]
    sigmas = {"dp_counts": gaussian_sigma(1.0, 1e-5), "dp_counts_agm": analytic_gaussian_sigma(1.0, 1e-5)}
    for setting in settings:
        alpha, k = parse_setting(setting)
        extra = [f"partition.min_size={min_size_01_100}"] if (alpha, k) == (0.1, 100) else []
        cfg = load_config(None, ["mode=federated", f"partition.alpha={alpha}", f"partition.num_clients={k}", *extra])
        exp = experiment_for(cfg)
        per_client, counts = exp.partition_counts().astype(float), exp.train_counts
        few = class_groups(counts)[0] == 2
        for name, sigma in sigmas.items():
            errs = [prior_errors(counts, dp_counts_estimate(list(per_client + np.random.default_rng(d).normal(
                0, sigma, per_client.shape))).pi_hat, few) for d in range(draws)]
            m = {key: float(np.mean([e[key] for e in errs])) for key in errs[0]}
            lines.append(f"| {alpha} | {k} | {name} | {sigma:.3f} | {m['l1']:.4f} | {m['kl']:.5f} | "
                         f"{m['few_rel_err']:.3f} |")
        print("\n".join(lines[-2:]), flush=True)
    return lines


def cell(m: dict) -> str:
    return f"{m['accuracy']:.3f} ({m['few']:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=[f"{a}:{k}" for a in ALPHAS for k in CLIENTS_K],
                    help="α:K pairs, in the order to run them")
    ap.add_argument("--rounds", type=int, default=16, help="rounds of the accuracy runs")
    ap.add_argument("--posthoc-settings", nargs="*", default=None, help="α:K for post-hoc accuracy (default: all)")
    ap.add_argument("--gbme-settings", nargs="*", default=["0.5:10"], help="α:K for GBME accuracy")
    ap.add_argument("--gbme-keys", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides of the GBME runs (e.g. model.classifier=linear)")
    ap.add_argument("--min-size", type=int, default=None,
                    help="partition.min_size (α=0.1 with 100 clients has no draw with the default 10 per client)")
    ap.add_argument("--noise-only", type=int, default=0, metavar="DRAWS",
                    help="only compare dp_counts with dp_counts_agm over DRAWS noise draws per setting")
    ap.add_argument("--out", default="runs/prior_estimators")
    args = ap.parse_args()
    if args.min_size is not None:
        MIN_SIZE.append(f"partition.min_size={args.min_size}")
    try:  # the GBME runs' configs, checked now: a bad --gbme-keys fails in one line, not after the estimates
        for setting in args.gbme_settings:
            gbme_configs(*parse_setting(setting), args.seeds[0], args.rounds, tuple(args.gbme_keys))
    except FedLTError as exc:
        sys.exit(f"error: {exc}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.noise_only:
        lines = noise_only(args.settings, args.noise_only)
        (out / "noise_only.md").write_text(f"## Noisy counts, ε = 1, δ = 1e-5: mean over {args.noise_only} draws\n"
                                           + "\n".join(lines) + "\n")
        return
    posthoc_settings = args.settings if args.posthoc_settings is None else args.posthoc_settings
    raw: dict = {"errors": {}, "posthoc": {}, "gbme": {}, "args": vars(args)}
    err = ["| α | K | estimator | L1 | KL(π‖π̂) | few-shot rel. err |", "|---|---|---|---|---|---|"]
    ph = ["| α | K | uncalibrated | " + " | ".join(ESTIMATORS) + " |", "|---" * (len(ESTIMATORS) + 3) + "|"]
    gb = ["| α | K | " + " | ".join(ESTIMATORS) + " |", "|---" * (len(ESTIMATORS) + 2) + "|"]
    seed0 = args.seeds[0]

    def write() -> None:
        text = "\n".join([f"## Estimation error (mean over seeds {', '.join(map(str, args.seeds))})", *err, "",
                          f"## Post-hoc calibration over FedAvg: test accuracy (few-shot accuracy), seed {seed0}, "
                          f"{args.rounds} rounds", *ph, "",
                          f"## GBME (small_cnn_experts): test accuracy (few-shot accuracy), seed {seed0}, "
                          f"{args.rounds} rounds", *gb]) + "\n"
        (out / "prior_estimators.md").write_text(text)
        (out / "prior_estimators.json").write_text(json.dumps(raw, indent=1))

    for setting in args.settings:
        alpha, k = parse_setting(setting)
        errs, pis = {e: [] for e in ESTIMATORS}, None
        for seed in args.seeds:
            t0 = time.time()
            cfg = config(alpha, k, seed, args.rounds)
            counts = experiment_for(cfg).train_counts
            few = class_groups(counts)[0] == 2
            est = estimates(cfg)
            pis = pis or est
            for e in ESTIMATORS:
                errs[e].append(prior_errors(counts, est[e], few))
            print(f"α={alpha} K={k} seed={seed}: {time.time() - t0:.0f}s", flush=True)
        for e in ESTIMATORS:
            m = {key: float(np.mean([d[key] for d in errs[e]])) for key in errs[e][0]}
            raw["errors"][f"{alpha}:{k}:{e}"] = {"mean": m, "per_seed": errs[e], "pi_hat_seed0": pis[e].tolist()}
            err.append(f"| {alpha} | {k} | {e} | {m['l1']:.3f} | {m['kl']:.3f} | {m['few_rel_err']:.2f} |")
        print("\n".join(err[-len(ESTIMATORS):]), flush=True)
        write()
        if setting in posthoc_settings:
            t0 = time.time()
            row = raw["posthoc"][setting] = posthoc_row(alpha, k, seed0, args.rounds, pis)
            ph.append(f"| {alpha} | {k} | " + " | ".join(cell(row[n]) for n in ("uncalibrated", *ESTIMATORS)) + " |")
            print(ph[-1], f"{time.time() - t0:.0f}s", flush=True)
            write()
        if setting in args.gbme_settings:
            t0 = time.time()
            row = raw["gbme"][setting] = gbme_row(alpha, k, seed0, args.rounds, tuple(args.gbme_keys))
            gb.append(f"| {alpha} | {k} | " + " | ".join(cell(row[e]) for e in ESTIMATORS) + " |")
            print(gb[-1], f"{time.time() - t0:.0f}s", flush=True)
            write()
    print((out / "prior_estimators.md").read_text())


if __name__ == "__main__":
    main()
