#!/usr/bin/env bash
# The CIFAR-10-LT section of docs/results.md: β = 100 on the JPEG copy (../shared/data/cifar10-jpeg) at the CPU
# budget of configs/cifar10_jpeg_lt_cpu.yaml (ResNet-8), seed 0, most telling comparisons first: centralized CE and
# Balanced Softmax, federated FedAvg and FedLC, then LDAM-DRW, cRT, CCVR, CReFF, MiSLAS, BalPoE
# and GBME (both on resnet8_experts: the three-expert layout of their ResNet-32 at ResNet-8's depth, one block per
# stage, since the three-expert ResNet-32 does not fit this budget on 2 cores), the single-network methods of issue 14; then the
# comparison report. Resumable: finished runs are skipped. Run from the repository root:
#     bash benchmarks/cifar10_cpu_table.sh [OUT]
set -euo pipefail
OUT=${1:-runs/c10cpu}
PY=${PY:-.venv/bin/python}
CFG=configs/cifar10_jpeg_lt_cpu.yaml
# centralized runs go through the centralized table's script (cRT starts from the finished CE run, whose
# training is its stage 1); its budget keys are replaced by the config's: ResNet-8, 5 epochs, lr 0.1 cosine,
# batch 128, wd 2e-4. LDAM's DRW covers the last round(0.5·5) = 2 epochs; cRT and MiSLAS add 1 classifier epoch.
CEN=(data.name=cifar10_files data.root=../shared/data/cifar10-jpeg data.imbalance_factor=100 data.crop_padding=4
     model.name=resnet8 centralized.epochs=5 centralized.lr=0.1 centralized.batch_size=128
     centralized.weight_decay=2e-4 eval.every=5)
centralized() { PYTHONPATH=. $PY benchmarks/centralized_table.py --out "$OUT/centralized" --seeds 0 --threads 2 \
    --methods "$1" "${CEN[@]}" "${@:2}"; }
federated() { $PY -m fedlt.simulate --config $CFG --out "$OUT/federated" mode=federated "$@"; }
centralized ce,balanced_softmax
federated "sweep.strategy.name=[fedavg,fedlc]"
centralized ldam_drw,crt
federated "sweep.strategy.name=[ccvr,creff]"  # CReFF on ResNet-8 (its official ResNet-8×4 is 4× wider)
centralized mislas
centralized balpoe  # model.name=resnet8 -> resnet8_experts (BalPoE's full-width 32/64 experts, cosine s = 30)
federated strategy.name=gbme model.name=resnet8_experts  # GBME's layout (24/48 experts, cosine heads, s = 30)
# GBME's heads and prior (docs/results.md): the true prior; linear heads with GBME's estimate and with the true prior
federated name=c10jpeg-cpu-gbme-oracle strategy.name=gbme model.name=resnet8_experts strategy.prior=oracle
federated name=c10jpeg-cpu-gbme-linear strategy.name=gbme model.name=resnet8_experts model.classifier=linear \
    "sweep.strategy.prior=[gbme,oracle]"
# issue 14's single-network methods (their table EXTRA keys; CC-SAM adds 1 classifier epoch); LFME's student
# gets CE's 5 epochs after its 5 expert epochs
centralized seql,area,tde,cc_sam,glmc
centralized lfme centralized.stage2_epochs=5
centralized ce,balanced_softmax,ldam_drw,crt,mislas,balpoe,seql,area,tde,cc_sam,glmc,lfme  # (finished: the table)
$PY -m fedlt.compare "$OUT/centralized"/*/* "$OUT/federated" --out "$OUT/report"
