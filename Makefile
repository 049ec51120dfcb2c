# Everything installs itself, idempotently: run as root on Debian 12.
#   make demo   a sandboxed kernel runs examples/tour.ipynb and prints what it shows
#   make test   the whole test suite, against the real runsc and the real guest image
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKEND ?= gvisor

.PHONY: setup host venv image demo test bench lint fuzz gc

setup: host venv image

host:
	bash scripts/install-host.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml kernelspecs/python3-gvisor/kernel.json kernelspecs/python3-microvm/kernel.json
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lab]'
	$(BIN)/jupyter kernelspec install kernelspecs/python3-gvisor --sys-prefix --replace
	$(BIN)/jupyter kernelspec install kernelspecs/python3-microvm --sys-prefix --replace
	touch $@

image: host venv
	$(BIN)/jupyter sandbox image build

demo: setup
	$(BIN)/python examples/run_tour.py --kernel python3-$(BACKEND)

test: setup
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/run.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

gc: venv
	$(BIN)/jupyter sandbox gc
