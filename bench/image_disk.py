#!/usr/bin/env python3
"""Disk used by N containers of one image: their overlay upper dirs only (the image's layers
are shared, read-only, and counted once).

Starts N apache-php containers on a private bridge, sends each one GET / (so Apache and PHP
have written whatever they write at start and on a request), then measures every upper dir
with `du`. Prints JSON. Needs root and the apache-php image (`fcrun image build apache-php`).
Usage: bench/image_disk.py [--containers 100] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from fcrun import Paths, RunOptions, Runtime, spec_from_image
from fcrun.images import ImageStore


def get(ip: str, deadline: float) -> int:
    while True:
        try:
            conn = http.client.HTTPConnection(ip, 80, timeout=5)
            conn.request("GET", "/")
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def du_bytes(path: str) -> int:
    out = subprocess.run(["du", "-sb", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--image-root", default=os.environ.get("FCRUN_ROOT", "/var/lib/fcrun"),
                        help="data root holding the apache-php image")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    image = ImageStore(Paths(data_root=args.image_root, run_root="/nonexistent")).get("apache-php")
    work = tempfile.mkdtemp(prefix="fcrun-disk-")
    tag = str(os.getpid())
    rt = Runtime(Paths(data_root=os.path.join(work, "data"), run_root=os.path.join(work, "run")),
                 cgroup_parent=f"fcrun-disk-{tag}", bridge=f"fcd{tag}"[:15], subnet="10.238.0.0/16")
    names = [f"disk-{i}" for i in range(args.containers)]
    try:
        t0 = time.monotonic()
        ips = []
        for name in names:
            spec = spec_from_image(image, RunOptions(cpu=0.3, memory_bytes=512 << 20), name=name)
            ips.append(rt.run(name, spec, image=image, detach=True).ip)
        started_s = time.monotonic() - t0
        statuses = [get(ip, time.monotonic() + 30) for ip in ips]
        uppers = [du_bytes(rt.states.load(n).rootfs.upper) for n in names]
        layer_bytes = sum(du_bytes(layer) for layer in image.layers)
        out = {
            "benchmark": "disk used by containers of one image (overlay upper dirs)",
            "image": "apache-php",
            "containers": len(names),
            "all_answered_200": statuses == [200] * len(names),
            "upper_total_bytes": sum(uppers),
            "upper_per_container_median_bytes": sorted(uppers)[len(uppers) // 2],
            "upper_per_container_max_bytes": max(uppers),
            "shared_image_layers_bytes": layer_bytes,
            "start_all_seconds": round(started_s, 2),
        }
    finally:
        for name in rt.states.names():
            rt.delete(name, force=True)
        rt.network.remove_bridge_if_unused()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
