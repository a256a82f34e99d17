"""Instance logs on the real kernel: a flood stays bounded and is not charged to the
instance's memory; `fcrun logs -f` follows across rotation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fcrun.logs.files import CURRENT, log_dir, log_files
from fcrun.logs.reader import STAMP_LEN, read_lines
from fcrun.runtime.options import RunOptions, spec_from_image
from polling import wait_until

pytestmark = [pytest.mark.root]

MAX_BYTES = 4 << 20
COUNT = 2
FLOOD_BYTES = 500 << 20


def start_detached(rt, image, name, script, **opts):
    spec = spec_from_image(image, RunOptions(args=["sh", "-c", script], **opts), name=name)
    return rt.run(name, spec, image=image, detach=True)


def _last_bytes(directory: str) -> bytes:
    with open(os.path.join(directory, CURRENT), "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 200))
        return f.read()


def test_a_flood_of_output_is_bounded_on_disk_and_not_charged_to_the_instance(runtime, busybox, monkeypatch):
    monkeypatch.setenv("FCRUN_LOG_MAX_BYTES", str(MAX_BYTES))
    monkeypatch.setenv("FCRUN_LOG_COUNT", str(COUNT))
    # 500 MiB of 100-byte lines under a 64 MiB limit. Written to a file on the run root's
    # tmpfs (/run/fcrun, before the log writer) the pages were the container's memory: OOM.
    # Here the bound on disk is what the old output.log (one growing file) would fail.
    line = "x" * 99
    script = f"yes {line} | head -c {FLOOD_BYTES}; echo flood-done"
    container = start_detached(runtime, busybox, "t-flood", script, memory_bytes=64 << 20, network="none")
    code = container.wait()
    directory = log_dir(runtime.paths, "t-flood")
    wait_until("the writer to write the last line", lambda: _last_bytes(directory).endswith(b" flood-done\n"),
               detail=lambda: _last_bytes(directory))
    assert code == 0, "the flood was killed (137: OOM)"
    files = log_files(directory)
    on_disk = sum(os.path.getsize(p) for p in files)
    assert len(files) == COUNT + 1
    assert on_disk <= (COUNT + 1) * MAX_BYTES, f"{on_disk} bytes of logs for a bound of {(COUNT + 1) * MAX_BYTES}"
    runtime.delete("t-flood")
    # Kept after the container is gone.
    assert os.path.exists(os.path.join(directory, CURRENT))


def test_logs_follow_sees_lines_written_after_it_started_across_rotation(runtime, busybox, data_root, monkeypatch):
    # 2000 lines need ~32 files of 4 KiB: all kept, so a follower that falls behind the writer
    # by several rotations still finds every line (it cannot once the writer removed a file).
    monkeypatch.setenv("FCRUN_LOG_MAX_BYTES", "4096")
    monkeypatch.setenv("FCRUN_LOG_COUNT", "40")
    script = ("echo waiting; while [ ! -e /tmp/go ]; do sleep 0.05; done; "
              "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done; echo last; exec sleep 60")
    start_detached(runtime, busybox, "t-follow", script, network="none")
    directory = log_dir(runtime.paths, "t-follow")
    wait_until("the container to start writing", lambda: os.path.exists(os.path.join(directory, CURRENT)))
    follower = subprocess.Popen([sys.executable, "-m", "fcrun_cli", "--root", data_root, "logs", "-f", "t-follow"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout.readline() == "waiting\n"  # it has the file open
        assert runtime.exec("t-follow", ["touch", "/tmp/go"]) == 0
        seen = []
        for text in follower.stdout:
            seen.append(text.rstrip("\n"))
            if text == "last\n":
                break
    finally:
        follower.terminate()
        follower.wait(timeout=10)
        follower.stdout.close()
    assert seen == [f"line {i}" for i in range(2000)] + ["last"]
    assert len(log_files(directory)) > 10  # it did rotate, many times
    kept = list(read_lines(directory))
    assert [line[STAMP_LEN + 1:] for line in kept] == ["waiting"] + seen
    runtime.delete("t-follow", force=True)


def test_serve_keeps_apaches_logs_per_app_and_writes_its_access_log(tmp_path, apache_php):
    from serving import serving

    # The instance is a claimed pooled one: it learns its app at the claim (hand_over).
    with serving(tmp_path, apache_php, "[forkserver]\npool_size = 1\n[proxy]\naccess_log = true\n") as srv:
        site = tmp_path / "site"
        site.mkdir()
        (site / "index.php").write_text("<?php error_log('php says hello'); echo 'hi';")
        srv.cli("app", "add", "logs.test", "--image", "apache-php", "--cpu", "0.5", "--memory", "128M",
                "--docroot", str(site))
        srv.start()
        for _ in range(3):
            assert srv.request("logs.test", "/?q=marker")[0] == 200
        wait_until("serve's access lines", lambda: srv.read_log().count("access app=logs.test") >= 3,
                   detail=srv.read_log)
        line = next(x for x in srv.read_log().splitlines() if "access app=logs.test" in x)
        assert " INFO fcrun serve: " in line and " status=200 " in line
        instance = line.split(" instance=")[1].split()[0]

        def app_logs():
            return srv.cli("app", "logs", "logs.test", check=False).stdout

        # Apache's access log (its stdout) and PHP's error_log (stderr), each line with the instance.
        wait_until("Apache's access lines in fcrun app logs", lambda: app_logs().count("GET /?q=marker") == 3,
                   detail=app_logs)
        assert all(x.startswith(instance + " ") for x in app_logs().splitlines() if "marker" in x)
        wait_until("PHP's error_log line", lambda: "php says hello" in app_logs(), detail=app_logs)
