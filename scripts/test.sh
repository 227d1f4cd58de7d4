#!/usr/bin/env bash
# Build nbd-uring into .venv and run lint, type checks and the test suite.
# Extra arguments go to pytest, e.g.  scripts/test.sh -m 'not integration' -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --system-site-packages so the Debian python3-libnbd module (`import nbd`) is visible.
if [[ ! -x .venv/bin/python ]]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

python -m pip install -q -e '.[test]'

echo "== ruff"
ruff check .
echo "== mypy"
mypy
echo "== pytest"
python -m pytest "$@"
