#!/usr/bin/env bash
# Install fcrun's host packages and a virtualenv with fcrun in it (idempotent). Run as root.
#   Debian packages: runc (benchmark baseline), busybox-static (busybox image), mmdebstrap
#   (apache-php image), tini (pid 1 inside containers), iproute2, wrk (benchmarks), gcc and
#   libc6-dev (the static probe the security tests run inside containers).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root" >&2; exit 77; fi
need=()
for pkg in runc busybox-static mmdebstrap tini iproute2 wrk python3-venv gcc libc6-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
