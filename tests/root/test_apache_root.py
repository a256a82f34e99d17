"""Apache + mod_php from Debian packages, run by fcrun, answering over the bridge network."""

from __future__ import annotations

import os

import pytest
from polling import http_get_when_up

from fcrun.runtime.options import RunOptions, spec_from_image

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_apache_php_serves_phpinfo_in_an_fcrun_container(runtime, apache_php):
    spec = spec_from_image(apache_php, RunOptions(cpu=0.5, memory_bytes=256 << 20), name="t-apache")
    container = runtime.run("t-apache", spec, image=apache_php, detach=True)
    status, _, body = http_get_when_up(container.ip)
    assert status == 200
    assert "PHP Version 8." in body and "phpinfo()" in body and "apache2handler" in body
    # The master runs as root, its prefork workers as www-data (33), all in the container's pid ns.
    r, w = os.pipe()
    code = runtime.exec("t-apache", ["sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status | cut -f2 | sort | uniq -c"],
                        stdio=(0, w, w))
    os.close(w)
    with os.fdopen(r) as f:
        uids = {int(uid): int(n) for n, uid in (line.split() for line in f.read().splitlines())}
    assert code == 0
    assert uids.get(33, 0) >= 2 and 0 in uids
    runtime.delete("t-apache", force=True)


def test_apache_php_serves_a_bind_mounted_docroot(runtime, apache_php, tmp_path):
    from fcrun.runtime.spec import Mount

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.php").write_text("<?php echo 'hello from ', gethostname(), ' php ', PHP_VERSION;")
    spec = spec_from_image(apache_php, RunOptions(), name="t-site")
    spec.mounts.append(Mount(destination=apache_php.config.docroot, source=str(site), options=["rbind", "ro"]))
    container = runtime.run("t-site", spec, image=apache_php, detach=True)
    status, _, body = http_get_when_up(container.ip)
    assert status == 200
    assert body.startswith("hello from t-site php 8.")
    runtime.delete("t-site", force=True)
