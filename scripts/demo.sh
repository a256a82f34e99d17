#!/usr/bin/env bash
# The demo from README.md: `fcrun serve` with an app that cold-starts on its first request.
#   ./scripts/demo.sh          run the demo, then stop the server (leaves nothing running)
#   ./scripts/demo.sh --keep   keep serving in the foreground afterwards (Ctrl-C stops it)
# Installs what it needs (./scripts/setup.sh), builds the apache-php image once (~30 s, from
# Debian packages), serves on 127.0.0.1:8080, and uses its own state roots under /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
keep=${1:-}
export FCRUN_ROOT=${FCRUN_ROOT:-/var/lib/fcrun} FCRUN_RUN=${FCRUN_RUN:-/run/fcrun}
fcrun=.venv/bin/fcrun
listen=127.0.0.1:8080

# The demo site lives in this checkout: allow docroots under examples/ (by default only
# /srv and /var/www are; see docroot_roots in README), for `app add` and for serve.
made_config=
if [ -z "${FCRUN_CONFIG:-}" ]; then
    FCRUN_CONFIG=$(mktemp /tmp/fcrun-demo-XXXXXX.toml)
    made_config=$FCRUN_CONFIG
fi
export FCRUN_CONFIG
[ -s "$FCRUN_CONFIG" ] || printf 'docroot_roots = ["%s"]\n' "$PWD/examples" > "$FCRUN_CONFIG"

$fcrun image build apache-php
$fcrun app rm demo.test >/dev/null 2>&1 || true
$fcrun app add demo.test --image apache-php --docroot "$PWD/examples/demo-site" --cpu 0.3 --memory 512M \
    --freeze-after 2s --idle-timeout 20s

$fcrun serve --listen "$listen" &
serve_pid=$!
trap 'kill -TERM $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null || true; [ -z "$made_config" ] || rm -f "$made_config"' EXIT
for _ in $(seq 100); do
    .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', 8080), 0.2)" 2>/dev/null && break
    sleep 0.1
done

get() { .venv/bin/python - "$@" <<'PY'
import sys, time, http.client
conn = http.client.HTTPConnection("127.0.0.1", 8080, timeout=30)
t = time.perf_counter()
conn.request("GET", "/", headers={"Host": sys.argv[1]})
r = conn.getresponse()
body = r.read().decode().strip()
cold = r.getheader("X-Fcrun-Cold-Start")
how = f" (cold start via {r.getheader('X-Fcrun-Cold-Start-Path')}: {cold} ms)" if cold else (
    " (already running)" if r.status == 200 else "")
print(f"  {r.status} in {(time.perf_counter() - t) * 1000:.1f} ms{how}: {body}")
PY
}
# The fork-server pre-warms instances for the app's image (Apache/PHP up, then frozen, no app yet).
for _ in $(seq 100); do
    $fcrun ps | awk '$2 == "frozen" && $NF == "-"' | grep -q . && break
    sleep 0.1
done
echo "== no instance of demo.test yet; the pool's pre-warmed ones (APP -):"; $fcrun ps
echo "== first request (a pooled instance is claimed for demo.test):"; get demo.test
echo "== second request:"; get demo.test
echo "== idle for 3 s: the instance is frozen (freeze-after 2s):"; sleep 3; $fcrun ps
echo "== the next request thaws it:"; get demo.test
echo "== unknown host:"; get nobody.test || true
$fcrun stats
if [ "$keep" = "--keep" ]; then
    echo "== serving http://$listen/ (Host: demo.test); Ctrl-C to stop"
    wait $serve_pid
fi
