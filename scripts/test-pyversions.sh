#!/usr/bin/env bash
# The unit tests on every other supported Python this machine has (3.12, 3.13: python3.X on PATH, else
# pyenv's /root/.pyenv/versions/3.X.*), each in its own virtualenv .venv-3.X with fcrun installed editable.
# scripts/test.sh runs this after the main run (3.11, .venv), so CI covers all three; a version this machine
# lacks is said on stderr and skipped. Arguments go to pytest (default: tests/unit). Run as root (setup.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/unit -q -p no:cacheprovider)
status=0
for version in 3.12 3.13; do
    py=$(command -v "python$version" || true)
    if [ -z "$py" ] || ! "$py" -c pass 2>/dev/null; then  # a pyenv shim without the version fails here
        py=$(ls -d /root/.pyenv/versions/"$version".*/bin/python"$version" 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    if [ -z "$py" ]; then
        echo "test-pyversions.sh: no Python $version on this machine: its unit tests are not run" >&2
        continue
    fi
    venv=.venv-$version
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
    echo "== unit tests on Python $("$venv/bin/python" -c 'import sys; print(sys.version.split()[0])') ($venv)"
    "$venv/bin/python" -m pytest "${args[@]}" || status=$?
done
exit $status
