#!/usr/bin/env bash
# Install fcrun's host packages and a virtualenv with fcrun in it (idempotent). Run as root.
#   Debian packages: runc (benchmark baseline), busybox-static (busybox image), mmdebstrap
#   (apache-php image), tini (pid 1 inside containers), iproute2, wrk (benchmarks), gcc and
#   libc6-dev (the static probe the security tests run inside containers), postgresql (the PostgreSQL
#   CMDB's tests start a server of their own in a temporary directory; Debian's cluster is not used), libpq5 (psycopg).
#   Without their recommends (no buildah, netavark, slirp4netns): golang-go (builds the OCI runtime-tools
#   validation suite, tests/root/test_oci_validation_root.py), podman and conmon (an engine driving runc and
#   fcrun-oci, tests/root/test_podman_root.py), chromium (headless, the browser that loads serve's dashboard in
#   tests/root/test_dashboard_root.py over the DevTools protocol), skopeo (`fcrun image pull` copies from
#   registries through it) and docker-registry (tests/root/test_pull_root.py starts one of its own on 127.0.0.1;
#   the service the package enables, on *:5000, is disabled again when this script installs it), umoci (with
#   skopeo, tests/root/test_images_root.py builds an image the way real tools do and imports it). About 15 s of apt here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root" >&2; exit 77; fi
need=()
for pkg in runc busybox-static mmdebstrap tini iproute2 wrk python3-venv gcc libc6-dev postgresql libpq5; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
lean=()
for pkg in golang-go podman conmon chromium skopeo docker-registry umoci; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || lean+=("$pkg")
done
if [ ${#need[@]} -gt 0 ] || [ ${#lean[@]} -gt 0 ]; then
    apt-get update -qq
fi
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ${#lean[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null
    if [[ " ${lean[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
