# Two entry points for a fresh machine (see README):
#   make train   set up .venv with what the main job runs, prepare the data (a verified store is reused),
#                train recipes/quickstart.toml (run again: the finished run only prints its result)
#   make test    the same .venv plus the [dev] extra (pytest and the optional integrations), run the test suite
# Data source: SOURCE=... or $FASTCIFAR_SOURCE, else the store already prepared, else the official archive is
# downloaded.

PYTHON ?= python3
VENV   ?= .venv
STORE  ?= data/cifar10
RECIPE ?= recipes/quickstart.toml
BIN     = $(VENV)/bin

.PHONY: install install-dev prepare train test clean

# The main job's packages only (torch, torchvision, numpy, pillow, rich, torchmetrics, matplotlib, nvidia-ml-py).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e .
	touch $@

# What the tests add: pytest, hypothesis, scikit-learn, tensorboard, timm, onnx, onnxruntime, airbench.
$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

install-dev: $(BIN)/.installed-dev

prepare: install
	$(BIN)/fastcifar prepare $(if $(SOURCE),--source $(SOURCE)) --out $(STORE)

train: prepare
	$(BIN)/fastcifar train $(RECIPE) --set data.store='"$(STORE)"' --resume

test: install-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
