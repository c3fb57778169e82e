# keyedge developer commands. The two set-up commands of the README:
#   make demo   -- create ./.venv, install keyedge into it, run the main job (keyedge quickstart)
#   make test   -- create ./.venv, install keyedge into it, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keyedge-installed

.PHONY: setup demo shuffle-demo lint test gate bench clean rknn-env

# Offline labelled data (Debian's Fashion-MNIST package) for training tests and demos.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml constraints.txt
	@[ -d $(FASHION_MNIST) ] || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
	  || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/keyedge quickstart --out demo --overwrite

# the shuffle on a photo: what you see, and what a keyed model sees
shuffle-demo: $(STAMP)
	mkdir -p demo-shuffle
	$(BIN)/keyedge key new --block-size 8 --out demo-shuffle/k1.bin --overwrite
	$(BIN)/python -m keyedge.data.samples astronaut demo-shuffle/astronaut.png
	$(BIN)/keyedge shuffle demo-shuffle/astronaut.png --key-file demo-shuffle/k1.bin --out demo-shuffle/astronaut-shuffled.png --overwrite
	$(BIN)/keyedge shuffle demo-shuffle/astronaut-shuffled.png --key-file demo-shuffle/k1.bin --inverse --out demo-shuffle/astronaut-restored.png --overwrite
	$(BIN)/keyedge key show demo-shuffle/k1.bin

# the rule set in pyproject.toml ([tool.ruff]); `ruff format .` and `ruff check --fix .` repair most findings;
# then the documentation site (mkdocs.yml), warnings as errors: a broken link or a page outside the nav fails
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d build/site

test: $(STAMP)
	$(BIN)/pytest

# CI latency gate: keyed vs plain EfficientNet-Lite0 at 224, ratios only (devices/ci-cpu.toml); exit 1 on a regression
gate: $(STAMP)
	$(BIN)/python -m keyedge.benchmarks.gate --out build/gate

bench: $(STAMP)
	$(BIN)/python -m keyedge.benchmarks.experiments.transform

# the rknn target's converter (rknn-toolkit2 2.5.0, Rockchip NPUs) in its own venv: it pins numpy<=1.26.4, onnx<=1.18
# and protobuf<=4.25, which .venv cannot hold.  --no-deps with exporters/rknn-requirements.txt: no torch, no CUDA
# wheels.  keyedge finds it as .venv-rknn/bin/python (or KEYEDGE_RKNN_PYTHON); the last line checks it loads.
RKNN_VENV := .venv-rknn
RKNN_STAMP := $(RKNN_VENV)/.keyedge-installed

$(RKNN_STAMP): exporters/rknn-requirements.txt exporters/rknn_worker.py
	$(PYTHON) -m venv $(RKNN_VENV)
	$(RKNN_VENV)/bin/python -m pip install --quiet --no-deps -r exporters/rknn-requirements.txt
	$(RKNN_VENV)/bin/python -I exporters/rknn_worker.py '{"check": true}'
	touch $(RKNN_STAMP)

rknn-env: $(RKNN_STAMP)

clean:
	rm -rf $(VENV) $(RKNN_VENV) demo demo-shuffle build dist *.egg-info .pytest_cache .hypothesis
