#!/usr/bin/env bash
# The CIFAR-10-LT section of docs/results.md: β = 100 on the JPEG copy (../shared/data/cifar10-jpeg), ResNet-32,
# at the CPU budget of configs/cifar10_jpeg_lt_cpu.yaml, seed 0; centralized CE, Balanced Softmax, LDAM-DRW, cRT,
# MiSLAS, BalPoE and federated FedAvg, FedLC, CCVR, CReFF, GBME; then the comparison report. Resumable: finished
# runs are skipped. About 1.5 h on 2 CPU cores. Run from the repository root:
#     bash benchmarks/cifar10_cpu_table.sh [OUT]
set -euo pipefail
OUT=${1:-runs/c10cpu}
PY=${PY:-.venv/bin/python}
CFG=configs/cifar10_jpeg_lt_cpu.yaml
# centralized: the centralized table's script (cRT starts from the finished CE run: its stage 1 is that run);
# its budget options are replaced by the config's (ResNet-32, 5 epochs, lr 0.1 cosine, batch 128, wd 2e-4);
# LDAM's DRW covers the last round(0.5·5) = 2 epochs, cRT / MiSLAS add 1 classifier epoch.
CEN=(data.name=cifar10_files data.root=../shared/data/cifar10-jpeg data.imbalance_factor=100 data.crop_padding=4
     model.name=resnet32 centralized.epochs=5 centralized.lr=0.1 centralized.batch_size=128
     centralized.weight_decay=2e-4 eval.every=5)
PYTHONPATH=. $PY benchmarks/centralized_table.py --out "$OUT/centralized" --seeds 0 --threads 2 \
    --methods ce,balanced_softmax,ldam_drw,crt,mislas,balpoe "${CEN[@]}"
# federated: FedAvg, FedLC (τ = 1), CCVR, CReFF on ResNet-32 (not CReFF's ResNet-8×4: one model for every row)
$PY -m fedlt.simulate --config $CFG --out "$OUT/federated" mode=federated "sweep.strategy.name=[fedavg,fedlc,ccvr,creff]"
# GBME: its three-expert ResNet-32 (cosine heads, s = 30)
$PY -m fedlt.simulate --config $CFG --out "$OUT/federated" mode=federated strategy.name=gbme model.name=resnet32_experts
$PY -m fedlt.compare "$OUT/centralized"/*/* "$OUT/federated" --out "$OUT/report" || true
