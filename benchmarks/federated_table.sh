#!/usr/bin/env bash
# The federated table of docs/results.md: Fashion-MNIST-LT β=100, α=0.5, 10 clients, 5 per round,
# 10 rounds of 1 local epoch, seeds 0-2, every strategy; then the comparison report of those runs.
# CPU only; about 1 minute per run on 2 idle cores. Run from the repository root:
#     bash benchmarks/federated_table.sh [OUT]
set -euo pipefail
OUT=${1:-runs/fed_table}
PY=${PY:-.venv/bin/python}
COMMON=(mode=federated federation.rounds=10 sweep.seed=[0,1,2])
$PY -m fedlt.simulate --out "$OUT" "${COMMON[@]}" name=fmnist \
    "sweep.strategy.name=[fedavg,fedprox,fedavgm,fedlc,ccvr,posthoc_calibration,creff]"
$PY -m fedlt.simulate --out "$OUT" "${COMMON[@]}" name=fmnist-bslocal client.name=local_loss client.loss=balanced_softmax
$PY -m fedlt.simulate --out "$OUT" "${COMMON[@]}" name=fmnist strategy.name=gbme model.name=small_cnn_experts
$PY -m fedlt.simulate --out "$OUT" mode=centralized centralized.epochs=8 sweep.seed=[0,1,2] name=fmnist \
    "sweep.centralized.method=[ce,balanced_softmax]"
$PY -m fedlt.compare "$OUT" --out "$OUT/report"
