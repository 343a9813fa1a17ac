#!/usr/bin/env bash
# The personalised-methods table of docs/results.md ("Federated methods of 2023–2025"): the federated table's
# budget (Fashion-MNIST-LT β=100, Dirichlet α=0.5 with NIID-Bench's balance, 10 clients, 5 per round, 10 rounds
# of 1 local epoch, small_cnn), seeds 0-2, global accuracy and each client's personalised accuracy
# (eval.local=final). CPU only; 1-5 minutes per run on 2 idle cores (FedETF's shortened personalisation the
# longest). In-process engine (bit-identical to Flower's simulation engine). Run from the repository root:
#     bash benchmarks/personalised_table.sh [OUT]
set -euo pipefail
OUT=${1:-runs/personalised_table}
PY=${PY:-.venv/bin/python}
COMMON=(mode=federated federation.rounds=10 sweep.seed=[0,1,2] partition.balance=true federation.engine=inprocess
        eval.local=final)
# FedAvg + FT and FedBABU: 1 epoch of fine-tuning for the personalised model (FedBABU's official 5 is CPU-heavy)
$PY -m fedlt.simulate --out "$OUT" "${COMMON[@]}" name=fmnist-ft eval.finetune_epochs=1 \
    "sweep.strategy.name=[fedavg,fedbabu]"
$PY -m fedlt.simulate --out "$OUT" "${COMMON[@]}" name=fmnist "sweep.strategy.name=[fedrod,fedgrab]"
# FedETF: personalisation shortened to 2 alternations (E + 2 x (3 + 3) local epochs; the official 20 is 121)
$PY -m fedlt.simulate --out "$OUT" "${COMMON[@]}" name=fmnist-pr2 strategy.name=fedetf client.personal_rounds=2
# FedLoGe at its own optimizer (lr 0.03, momentum 0.5, no weight decay), and at the table's
$PY -m fedlt.simulate --out "$OUT" "${COMMON[@]}" name=fmnist-own strategy.name=fedloge \
    train.lr=0.03 train.momentum=0.5 train.weight_decay=0
$PY -m fedlt.simulate --out "$OUT" "${COMMON[@]}" name=fmnist strategy.name=fedloge
$PY -m fedlt.compare "$OUT" --out "$OUT/report"
