# keyedge developer commands. The two set-up commands of the README:
#   make demo   -- create ./.venv, install keyedge into it, run the main job
#   make test   -- create ./.venv, install keyedge into it, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keyedge-installed

.PHONY: setup demo test gate bench clean

# Offline labelled data (Debian's Fashion-MNIST package) for training tests and demos.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	@[ -d $(FASHION_MNIST) ] || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	mkdir -p demo
	$(BIN)/keyedge keygen --block-size 8 --out demo/k1.bin --force
	$(BIN)/python -m keyedge.samples astronaut demo/astronaut.png
	$(BIN)/keyedge shuffle demo/astronaut.png --key-file demo/k1.bin --out demo/astronaut-shuffled.png --force
	$(BIN)/keyedge shuffle demo/astronaut-shuffled.png --key-file demo/k1.bin --inverse --out demo/astronaut-restored.png --force
	$(BIN)/python -c "import sys, numpy as np; from PIL import Image; a, b = (np.asarray(Image.open(f'demo/astronaut{s}.png')) for s in ('', '-restored')); sys.exit(0 if np.array_equal(a, b) else 'inverse did not restore the image')"
	$(BIN)/keyedge key show demo/k1.bin
	@echo "demo: see demo/astronaut.png (what you see) and demo/astronaut-shuffled.png (what the keyed model sees)"

test: $(STAMP)
	$(BIN)/pytest

# CI latency gate: keyed vs plain EfficientNet-Lite0 at 224, ratios only (devices/ci-cpu.toml); exit 1 on a regression
gate: $(STAMP)
	$(BIN)/python -m keyedge.benchmarks.gate --out build/gate

bench: $(STAMP)
	$(BIN)/python -m keyedge.benchmarks.transform

clean:
	rm -rf $(VENV) demo build dist *.egg-info .pytest_cache .hypothesis
