#!/usr/bin/env bash
# The test command: install the package with its test extras (this builds the Rust core with
# maturin), then run the pure-Rust tests and the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[dev]"

cargo test --locked --quiet

# headless Chromium for the report tests (tests/browser.py): Debian's package, installed only when
# absent and only where apt-get can (as root); elsewhere those tests skip and say why (under CI they fail)
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: chromium is not installed and cannot be installed here (apt-get as root);" \
         "the headless-browser report tests will skip" >&2
  fi
fi

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
