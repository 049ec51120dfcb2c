#!/usr/bin/env bash
# nbclient's own test suite, for the installed nbclient's version, with every kernel it
# starts sandboxed: the kernelspecs `python` and `python3` are python3-gvisor's (a
# JUPYTER_PATH folder comes before the venv's own kernels). The tests come from nbclient's
# sdist on PyPI (its wheel has none); what they need is nbclient's [test] extra, which this
# project's own [test] extra includes (`make venv`): the script only checks it is there, as
# installing it here could change the pytest, pytest-asyncio or ipykernel the rest use.
#   bash scripts/nbclient-tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${BIN:-.venv/bin}")
version=$("$BIN/python" -c 'import importlib.metadata as m; print(m.version("nbclient"))')
src=$PWD/build/nbclient-$version
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -d "$src/tests" ]; then
  "$BIN/python" -m pip download -q --no-binary :all: --no-deps "nbclient==$version" -d "$work"
  mkdir -p build
  tar -xzf "$work/nbclient-$version.tar.gz" -C build
fi
# --no-index: pip may only find everything installed already, or fail naming what is not.
if ! "$BIN/python" -m pip install -q --dry-run --no-index "nbclient[test]==$version"; then
  echo "nbclient $version's test requirements are missing or at other versions in $BIN's" \
    "venv: install the project's [test] extra (make venv)" >&2
  exit 1
fi

for name in python python3; do
  mkdir -p "$work/jupyter/kernels/$name"
  cp kernelspecs/python3-gvisor/kernel.json "$work/jupyter/kernels/$name/"
done
export JUPYTER_PATH=$work/jupyter
for name in python python3; do
  found=$("$BIN/jupyter" kernelspec list --json | "$BIN/python" -c \
    "import json, sys; print(json.load(sys.stdin)['kernelspecs']['$name']['spec']['metadata']['kernel_provisioner']['provisioner_name'])")
  if [ "$found" != gvisor-provisioner ]; then
    echo "kernelspec $name is not the sandboxed one: $found" >&2
    exit 1
  fi
done

cd "$src"
export PATH=$BIN:$PATH  # test_cli runs jupyter-execute
# Deselected: test_parallel_notebooks and test_async_parallel_notebooks run two kernels that
# hand each other a value through a host folder and an environment variable of the test
# process; each sandboxed kernel has its own private /tmp and environment, so isolation
# must (and does) break them.
exec "$BIN/python" -m pytest tests -p no:cacheprovider --timeout=600 -o log_cli_level=warning \
  -o asyncio_default_fixture_loop_scope=function \
  --deselect tests/test_client.py::test_parallel_notebooks \
  --deselect tests/test_client.py::test_async_parallel_notebooks "$@"
