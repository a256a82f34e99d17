#!/usr/bin/env bash
# The test command from README.md: set up (packages, venv), then run every test as root; without
# arguments, then the unit tests on the other Pythons this machine has (scripts/test-pyversions.sh).
# Root integration tests use their own state roots, cgroup parent and bridge, and remove
# everything they made; the last step checks that nothing of fcrun's is left on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pytest "$@"
# The whole run (no arguments, as CI runs it) also runs the unit tests on Python 3.12 and 3.13.
if [ $# -eq 0 ]; then
    ./scripts/test-pyversions.sh
fi
