# Two commands on a fresh machine (Debian/Ubuntu, Python 3.11):
#   make demo   installs everything, runs the default Fashion-MNIST-LT experiment (FedAvg and FedLC beside centralized CE)
#   make test   installs everything, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test test-heavy clean

$(FASHION):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[test,dp,tensorboard]"
	touch $@

setup: $(FASHION) $(VENV)/.installed

demo: setup
	$(PY) -m fedlt.simulate --config configs/default.yaml --out runs --report runs/report

test: setup
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile -m "not heavy" tests

test-heavy: setup
	$(PY) -m pytest -q -m heavy tests

clean:
	rm -rf runs
