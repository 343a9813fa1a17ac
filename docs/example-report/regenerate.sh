#!/bin/sh
# Regenerates docs/example-report: a small sweep (2 seeds x FedAvg/FedProx, 3 rounds, against
# centralized cross-entropy, 2 epochs) on the default Fashion-MNIST-LT setting, then its report.
# About 10 minutes on 2 CPU cores. Finished runs in runs/example are reused.
#   sh docs/example-report/regenerate.sh            (PY=path/to/python to choose the interpreter)
# To show the default demo instead: python -m fedlt.compare runs --out docs/example-report
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-python}
"$PY" -m fedlt.simulate --out runs/example federation.rounds=3 centralized.epochs=2 \
    'sweep.seed=[0,1]' 'sweep.strategy.name=[fedavg,fedprox]'
"$PY" -m fedlt.compare runs/example --out docs/example-report
