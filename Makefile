# Two entry points for a fresh machine (see README):
#   make train   set up .venv, install, prepare the data, train recipes/quickstart.toml
#   make test    set up .venv, install, run the test suite
# Data source: SOURCE=... or $FASTCIFAR_SOURCE, else the official archive is downloaded.

PYTHON ?= python3
VENV   ?= .venv
STORE  ?= data/cifar10
RECIPE ?= recipes/quickstart.toml
BIN     = $(VENV)/bin

.PHONY: install prepare train test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

prepare: install
	$(BIN)/fastcifar prepare $(if $(SOURCE),--source $(SOURCE)) --out $(STORE)

train: prepare
	$(BIN)/fastcifar train $(RECIPE) --set data.store='"$(STORE)"' --resume

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
