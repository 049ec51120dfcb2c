# Everything installs itself, idempotently: run as root on Debian 12.
#   make demo   a sandboxed kernel runs examples/tour.ipynb and prints what it shows
#   make test   the whole test suite, against the real runsc and the real guest image
#   make security-report   the attacks of the security suite, both backends: docs/attacks.md
#   make bench  the sandboxed kernels against the local one: benchmarks/results/
#   make bench-images   import time and disk use of a ~1 GiB image: benchmarks/results/images-*
#   make bench-kubernetes   a kernel through the Kubernetes backend (the cluster double) against
#                       local: benchmarks/results/kubernetes-*
#   make nbclient   nbclient's own test suite (from its PyPI sdist) with python3-gvisor as python3
#   make docs   the documentation (docs/) into docs/_build/html, warnings as errors
#   make fuzz   fuzz the tunnel's host end with hostile guest input, longer than make test does
#   make hub    the multi-tenant hub's software in /opt/jupyter-sandbox (deploy/install-hub.sh)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKEND ?= gvisor

.PHONY: setup host venv image hub browser kernels demo test security-report nbclient docs bench bench-images bench-kubernetes lint fuzz gc

setup: host venv image

host:
	bash scripts/install-host.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml kernelspecs/python3-gvisor/kernel.json kernelspecs/python3-microvm/kernel.json
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lab,docs]'
	$(BIN)/jupyter kernelspec install kernelspecs/python3-gvisor --sys-prefix --replace
	$(BIN)/jupyter kernelspec install kernelspecs/python3-microvm --sys-prefix --replace
	touch $@

image: host venv
	$(BIN)/jupyter sandbox image build

# What users' servers run (Debian's Python, readable by all) and configurable-http-proxy:
# the sandbox service's and the JupyterHub tests' users use it, as a deployment's do.
hub: setup
	bash deploy/install-hub.sh

# Debian's Chromium and chromedriver: the tests that drive JupyterLab in a real browser.
browser:
	bash scripts/install-browser.sh

# R with IRkernel on the host: the local kernel the sandboxed R kernels are compared with.
kernels:
	bash scripts/install-kernels.sh

demo: setup
	$(BIN)/python examples/run_tour.py --kernel python3-$(BACKEND)

test: setup hub browser kernels
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)
	$(MAKE) nbclient
	$(MAKE) docs

# The attack table, docs/attacks.md (tracked): every attack of the security suite
# against both backends (and gVisor on an imported image), and why each failed.
# `make test` runs the same attacks and writes nothing. SECURITY_TESTS narrows the
# run (the table then holds only its attacks).
ATTACK_TABLE ?= docs/attacks.md
SECURITY_TESTS ?= tests/security tests/test_network.py
security-report: setup
	$(BIN)/python -m pytest -ra -m attack --attack-table=$(ATTACK_TABLE) $(SECURITY_TESTS)

# nbclient's own suite, its kernels sandboxed (see the script for the two tests left out).
nbclient: setup
	BIN=$(BIN) bash scripts/nbclient-tests.sh

# Sphinx, MyST and the PyData theme (the [docs] extra); any warning fails the build.
docs: venv
	$(BIN)/sphinx-build -E -W --keep-going -n -b html docs docs/_build/html

bench: setup
	$(BIN)/python benchmarks/run.py

bench-images: setup
	$(BIN)/python benchmarks/images.py

bench-kubernetes: setup hub
	$(BIN)/python benchmarks/kubernetes.py

# The fuzzers of the tunnel's host end and of the other parsers of guest bytes, for
# JSB_FUZZ_SECONDS per test (make test runs them briefly). No sandbox is started.
JSB_FUZZ_SECONDS ?= 300
fuzz: venv
	JSB_FUZZ=1 JSB_FUZZ_SECONDS=$(JSB_FUZZ_SECONDS) $(BIN)/python -m pytest -rA -m fuzz \
		-p no:logging --timeout=$$(( 3 * $(JSB_FUZZ_SECONDS) + 600 )) tests/test_tunnel_fuzz.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

gc: venv
	$(BIN)/jupyter sandbox gc
