# Quick start: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED_MNIST := ../shared/data/mnist-10k
ARGS ?=

# Offline machines: use the shared MNIST subset when data/ has no MNIST of its own.
ifeq ($(wildcard data/MNIST/raw/train-images-idx3-ubyte),)
ifneq ($(wildcard $(SHARED_MNIST)/MNIST/raw),)
DATA_ARG := data_dir=$(SHARED_MNIST)
endif
endif

.PHONY: train test clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/neuralode-train $(DATA_ARG) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

clean-venv:
	rm -rf $(VENV)
