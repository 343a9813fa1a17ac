#!/bin/sh
# Regenerates docs/example-report from the default demo (README's first command): FedAvg and FedLC on
# Fashion-MNIST-LT (β=100, 10 clients, plain Dirichlet 0.5, 16 rounds, evaluated every 4) beside centralized cross-entropy.
# 3–6 minutes on 2 CPU cores (3 min 5 s on 2026-12-03, idle); finished runs in runs/ are reused (delete runs/ after a code change).
#   sh docs/example-report/regenerate.sh            (PY=path/to/python to choose the interpreter)
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
"$PY" -m fedlt.simulate --config configs/default.yaml --out runs --report docs/example-report
