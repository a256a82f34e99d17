#!/usr/bin/env bash
# The test command from README.md: set up (packages, venv), then run every test as root.
# Root integration tests use their own state roots, cgroup parent and bridge, and remove
# everything they made; the last step checks that nothing of fcrun's is left on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pytest "$@"
