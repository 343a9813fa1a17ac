"""Regenerate the "Centralized baselines" table of docs/results.md: every centralized method on
Fashion-MNIST-LT (IF = 100), several seeds, mean ± std of overall / many / medium / few accuracy.

    python benchmarks/centralized_table.py --out runs/centralized_table            # the stated budget
    python benchmarks/centralized_table.py --methods ce,la --seeds 0 KEY=VALUE ... # a subset / overrides
    python benchmarks/centralized_table.py --collect                                # table of the finished runs

Runs go through :func:`fedlt.simulate.run_config`, so a finished run directory is reused (the table can be
rebuilt, or extended to more methods, without retraining) and an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

METHODS = ["ce", "focal", "reweight", "cb", "ldam_drw", "la", "balanced_softmax", "bal_bce", "posthoc_la", "crt",
           "tau_norm", "lws", "mixup", "mislas", "balpoe", "mdcs", "glmc", "sbcl", "eql", "seql", "area", "tde", "tlc",
           "lfme", "shike", "cc_sam", "ncl"]
# The CPU budget of the table (2 shared CPU cores): small CNN, 2 epochs, SGD lr 0.1 cosine, batch 128; one
# classifier epoch for the decoupled second stages. DRW switches on for the last epoch (round(0.5·2) = 1),
# MDCS's consistency weight 0.6·min(e/1, 1) = 0.6 in both epochs (e counted from 1, as the official trainer).
BUDGET = ["mode=centralized", "model.name=small_cnn", "centralized.epochs=2", "centralized.lr=0.1",
          "centralized.batch_size=128", "centralized.schedule=cosine", "device=cpu"]
STAGE2 = {"crt": 1, "lws": 1, "mislas": 1, "sbcl": 1, "shike": 1, "cc_sam": 1}
# SBCL: SupCon in epoch 1, subclasses (clustered at the start of epoch 2) in epoch 2, then 1 LDAM-DRW epoch.
# EQL: λ = 0.02 silences the negatives of the 4 rarest classes (n_c/N < 2%; the official LVIS λ = 1.77e-3
# is below every class frequency of 10 classes); AREA re-weights in the second epoch, as DRW. CC-SAM: stage 1 with
# sam=cc_sam (its default), 1 epoch of its stage 2 (so α = min(1/1, up_limit) = 1: the noisy loss alone) at its
# default constant lr 0.01 (the official 0.1 × stage-1 lr, as the table's lr is the official 0.1)
# SHIKE: its official per-epoch warm-up cosine without the warm-ups (W = 0), peak lr 0.1 (epochs at 0.1, 0.05),
# then one classifier re-training epoch at its official peak 0.1.
SHIKE = ["centralized.warmup_epochs=0", "centralized.warmup_lr=0.1", "centralized.stage2_warmup_epochs=0"]
# cRT, LWS: their own stage-2 schedule (classifier-balancing's cosine stepped before each epoch) runs a single
# epoch at lr 0, and is refused; the table's one classifier epoch keeps the cosine within the epoch.
ONE_EPOCH = ["centralized.stage2_schedule=cosine"]
EXTRA = {"ldam_drw": ["centralized.drw_fraction=0.5"], "mdcs": ["centralized.ramp_fraction=0.5"],
         "crt": ONE_EPOCH, "lws": ONE_EPOCH,
         "sbcl": ["centralized.supcon_epochs=1", "centralized.cluster_step=1"],
         "eql": ["centralized.lam=0.02"], "seql": ["centralized.lam=0.02"], "area": ["centralized.area_fraction=0.5"],
         "tlc": ["centralized.drw_fraction=0.5"],
         "lfme": ["centralized.stage2_epochs=2"],  # LFME: 2 expert epochs, then a 2-epoch student from scratch
         "shike": SHIKE,
         # NCL without its MoCo term: with it the loss is NaN within the first epoch at lr 0.1 on this CNN
         # (docs/results.md); NIL + NBOD are the method's supervised part
         "ncl": ["centralized.contrastive=false"]}
# Stage 1 of these methods is plain CE training from the same seed and random streams, bit-identical on the
# CPU to the ce run (crt's stage-1 metrics equal ce's in the logs); to save CPU they start from ce's final
# checkpoint, so only their second stage (or post-hoc transform) runs.
FROM_CE = ("posthoc_la", "crt", "tau_norm", "lws")


def run_dir(out: str, method: str, seed: int) -> Path:
    """The run directory of ``method`` and ``seed`` (fedlt.sweep.run_name of config name ``table``)."""
    return Path(out) / method / f"table-seed{seed}-cen-{method}"


def start_from_ce(cfg: dict, out: str, seed: int) -> None:
    """Seed the run directory of ``cfg`` with the finished ce run's checkpoint (stage 1 done). The checkpoint
    records the digest of the config that wrote it, and a run refuses one of another config: the copy is
    re-stamped with this run's (its stage 1 is ce's, bit for bit)."""
    import shutil

    from fedlt.rundir import RunDir

    method = cfg.centralized.method
    ce, dest = run_dir(out, "ce", seed), run_dir(out, method, seed)
    if not (ce / "done").is_file() or (dest / "checkpoint.pt").is_file():
        return
    run = RunDir(dest)
    run.write_config(cfg)
    for name in ("env.json", "partition.json", "metrics.jsonl"):
        shutil.copy(ce / name, dest / name)
    ckpt = RunDir(ce).load_checkpoint()
    run.save_checkpoint({**ckpt, "config": run.config_digest()})


def config_for(method: str, seed: int, overrides: list[str]):
    """The table's config of ``method`` and ``seed``: the budget, the method's own settings, then ``overrides``
    (a one-line FedLTError where they are refused)."""
    from fedlt.config import load_config

    extra = [f"centralized.stage2_epochs={STAGE2[method]}"] if method in STAGE2 else []
    return load_config(None, [*BUDGET, f"centralized.method={method}", f"seed={seed}", "name=table", *extra,
                              *EXTRA.get(method, []), *overrides])


def run_all(methods: list[str], seeds: list[int], out: str, overrides: list[str]) -> dict[str, list[dict]]:
    from fedlt.simulate import run_config

    results: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in seeds:  # seed-major: a partial run still covers every method
        for method in methods:
            cfg = config_for(method, seed, overrides)
            if method in FROM_CE:
                start_from_ce(cfg, out, seed)
            t0 = time.time()
            summary = run_config(cfg, f"{out}/{method}")[0]
            print(f"{method} seed {seed}: acc {summary['accuracy']:.4f} ({time.time() - t0:.0f}s)", flush=True)
            results[method].append(summary)
    return results


def collect(methods: list[str], seeds: list[int], out: str) -> dict[str, list[dict]]:
    """The summaries of the finished runs under ``out`` (no training; missing runs are left out)."""
    results: dict[str, list[dict]] = {}
    for method in methods:
        for seed in seeds:
            f = run_dir(out, method, seed) / "summary.json"
            if f.is_file():
                results.setdefault(method, []).append(json.loads(f.read_text()))
    return results


def table(results: dict[str, list[dict]]) -> str:
    def cell(rows, key):
        v = np.array([r[key] for r in rows], dtype=float) * 100
        return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"

    lines = ["| method | seeds | overall | many | medium | few | ECE | s/run |", "|---|---|---|---|---|---|---|---|"]
    for method, rows in results.items():
        secs = np.mean([r["wall_clock_seconds"] for r in rows])
        cells = " | ".join(cell(rows, k) for k in ("accuracy", "many", "medium", "few", "ece"))
        lines.append(f"| {method} | {len(rows)} | {cells} | {secs:.0f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/centralized_table")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--collect", action="store_true", help="only tabulate the finished runs under --out")
    p.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    results = collect(methods, seeds, args.out) if args.collect else run_all(methods, seeds, args.out, args.overrides)
    text = table(results)
    print(text)
    with open(f"{args.out}/table.md", "w") as f:
        f.write(text + "\n")
    with open(f"{args.out}/results.json", "w") as f:
        json.dump({m: [{k: r[k] for k in ("seed", "accuracy", "many", "medium", "few", "ece", "wall_clock_seconds")}
                       for r in rows] for m, rows in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
