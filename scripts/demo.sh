#!/usr/bin/env bash
# The demo from README.md: set up, build the busybox image, run containers with limits.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
fcrun=.venv/bin/fcrun
set -x
$fcrun image build busybox
$fcrun run --image busybox --net none -- sh -c 'echo "hello from $(hostname), pid $$ in its own namespace"'
$fcrun run -d --name demo-web --image busybox --cpu 0.3 --memory 64M -- httpd -f -p 80 -h /etc
$fcrun ps
ip=$($fcrun ps --json | .venv/bin/python -c 'import json,sys; print([c["ip"] for c in json.load(sys.stdin) if c["name"]=="demo-web"][0])')
sleep 0.2
.venv/bin/python -c "import urllib.request; print(urllib.request.urlopen('http://$ip/hostname', timeout=5).read().decode().strip())"
$fcrun update demo-web --cpu 0.6
$fcrun exec demo-web -- cat /proc/self/cgroup
$fcrun rm -f demo-web
$fcrun ps
