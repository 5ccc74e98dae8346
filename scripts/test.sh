#!/usr/bin/env bash
# The test command: install the package with its test extras (this builds the Rust core with
# maturin), then run the pure-Rust tests and the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[dev]"

cargo test --locked --quiet

# the architecture contract: layers import only downwards, no cycles (pyproject [tool.importlinter])
lint-imports

set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating this as a failure" >&2
  exit 1
fi
exit "$status"
