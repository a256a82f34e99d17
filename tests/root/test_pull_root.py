"""`fcrun image pull` from a real registry: Debian's docker-registry (docker distribution 2.8),
started by this module on 127.0.0.1 with its storage in a temporary directory, fed with
skopeo. Images are the session's busybox layer plus a layer naming the platform, pushed as a
two-platform OCI index (amd64, arm64) and as a single manifest; a container then runs from
what was pulled. Traffic stays on loopback; the registry is stopped and its directory removed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hostcheck import BRIDGE, CGROUP_PARENT, SUBNET
from polling import retry_until_no_oserror

from fcrun.images.oci import host_platform
from fcrun.images.pull import PULL_TMP
from fcrun.images.store import TMP_DIR

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: imports layers, runs containers"),
    pytest.mark.skipif(
        not (shutil.which("skopeo") and os.access("/usr/bin/docker-registry", os.X_OK)),
        reason="needs skopeo and docker-registry (Debian packages; scripts/setup.sh installs them)",
    ),
]

REPO = "fcrun-test/bb"
HOST_ARCH = host_platform().split("/")[1]
WRONG = "sha256:" + "0" * 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """``127.0.0.1:PORT`` of a docker-registry serving plain HTTP from a temporary directory."""
    base = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = base / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {base / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: fcrun-test\n"
    )
    log = open(base / "registry.log", "wb")
    server = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(config)], stdout=log, stderr=log,
                              stdin=subprocess.DEVNULL)
    try:
        def answers() -> None:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(b"GET /v2/ HTTP/1.0\r\n\r\n")
                assert conn.recv(64).startswith(b"HTTP/1.0 200"), "the registry's /v2/ is not 200"
            assert server.poll() is None

        retry_until_no_oserror(f"docker-registry on 127.0.0.1:{port}", answers)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(base)


def _layer_from_tree(root: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name)
    return buf.getvalue()


def _layer_with_file(name: str, text: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(text), 0o644, 1_700_000_000
        tar.addfile(info, io.BytesIO(text.encode()))
    return buf.getvalue()


class Pushed:
    """Digests of what the module pushed: the index (tag multi) and its two manifests
    (the host's is also tag single)."""

    def __init__(self) -> None:
        self.index = ""
        self.manifests: dict[str, str] = {}


@pytest.fixture(scope="module")
def pushed(registry, busybox, tmp_path_factory) -> Pushed:
    """The session's busybox plus /arch, as an OCI layout holding a two-platform index, pushed
    with skopeo (--preserve-digests: the registry serves the very bytes hashed here)."""
    layout = tmp_path_factory.mktemp("layout")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    base = _layer_from_tree(busybox.layers[0])
    result = Pushed()
    manifests = []
    for arch in (HOST_ARCH, "arm64" if HOST_ARCH != "arm64" else "amd64"):
        layers = [base, _layer_with_file("arch", f"{arch}\n")]
        config = {"architecture": arch, "os": "linux",
                  "config": {"Cmd": ["sh"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]}}
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
                    "layers": [blob(gzip.compress(t, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip")
                               for t in layers]}
        desc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
        manifests.append(dict(desc, platform={"architecture": arch, "os": "linux"}))
        result.manifests[arch] = desc["digest"]
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    index_desc = blob(json.dumps(index).encode(), "application/vnd.oci.image.index.v1+json")
    result.index = index_desc["digest"]
    single = dict(manifests[0], annotations={"org.opencontainers.image.ref.name": "single"})
    del single["platform"]
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        dict(index_desc, annotations={"org.opencontainers.image.ref.name": "multi"}), single]}))
    for tag, options in (("multi", ["--all"]), ("single", [])):
        subprocess.run(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false", *options,
                        f"oci:{layout}:{tag}", f"docker://{registry}/{REPO}:{tag}"],
                       check=True, capture_output=True, timeout=120)
    return result


@pytest.fixture
def fcrun(runtime, data_root, run_root, tmp_path):
    """The CLI on the test's private roots (the runtime fixture removes containers and checks
    the host afterwards); CONTAINERS_REGISTRIES_CONF names no file unless a test writes it."""
    env = dict(os.environ, FCRUN_ROOT=data_root, FCRUN_RUN=run_root, FCRUN_CGROUP_PARENT=CGROUP_PARENT,
               FCRUN_BRIDGE=BRIDGE, FCRUN_SUBNET=SUBNET, FCRUN_CMDB=f"sqlite:///{tmp_path}/cmdb.sqlite3")
    env.pop("FCRUN_ADMIN_URL", None)

    def call(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fcrun_cli", *args], env=dict(env, **(extra_env or {})),
                              capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)

    return call


def store_state(data_root: str) -> dict:
    """Records, layers and work directories: what a refused pull must leave as it was."""
    def names(sub: str) -> list[str]:
        path = os.path.join(data_root, sub)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    return {sub: names(sub) for sub in ("images", "layers", TMP_DIR, PULL_TMP)}


def test_a_multi_arch_index_pulls_the_hosts_image_and_it_runs(fcrun, registry, pushed, data_root):
    before = store_state(data_root)
    r = fcrun("image", "pull", "--tls-verify=false", f"{registry}/{REPO}:multi", "pulled-multi")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # not a terminal: quiet
    name, image_id, repo_digest = r.stdout.split()
    assert (name, repo_digest) == ("pulled-multi", f"{registry}/{REPO}@{pushed.index}")
    try:
        record = json.loads(fcrun("image", "inspect", "pulled-multi").stdout)
        assert record["source"] == f"docker://{registry}/{REPO}:multi@{pushed.index}"
        assert record["repo_digest"] == repo_digest and record["id"] == image_id
        assert f"docker://{registry}/{REPO}:multi@{pushed.index}" in fcrun("image", "ls").stdout

        r = fcrun("run", "--image", "pulled-multi", "--net", "none", "--", "sh", "-c", "cat /arch; busybox true")
        assert (r.returncode, r.stdout) == (0, f"{HOST_ARCH}\n"), r.stderr
    finally:
        assert fcrun("image", "rm", "pulled-multi").returncode == 0
    after = store_state(data_root)
    assert after == before, "the removed image left something in the store"


def test_progress_and_another_platform_on_request(fcrun, registry, pushed, data_root):
    other = next(arch for arch in pushed.manifests if arch != HOST_ARCH)
    r = fcrun("image", "pull", "--tls-verify=false", "--progress", f"--platform=linux/{other}",
              f"{registry}/{REPO}:multi", "pulled-other")
    try:
        assert r.returncode == 0, r.stderr
        assert "Copying blob" in r.stderr and "pulled-other: imported" in r.stderr  # skopeo's and the store's
        record = json.loads(fcrun("image", "inspect", "pulled-other").stdout)
        arch_layer = record["layers"][-1]
        assert Path(arch_layer, "arch").read_text() == f"{other}\n"
        assert record["repo_digest"] == f"{registry}/{REPO}@{pushed.index}"
    finally:
        fcrun("image", "rm", "pulled-other")


def test_a_pinned_digest_pulls_exactly_that_and_a_wrong_one_is_refused(fcrun, registry, pushed, data_root):
    pinned = pushed.manifests[HOST_ARCH]
    r = fcrun("image", "pull", "--tls-verify=false", f"{registry}/{REPO}@{pinned}")
    assert r.returncode == 0, r.stderr
    name = f"bb:sha256-{pinned.removeprefix('sha256:')[:12]}"
    assert r.stdout.split()[0::2] == [name, f"{registry}/{REPO}@{pinned}"]
    fcrun("image", "rm", name)
    # tag and digest: the tag points at the index, so the two agree or the pull is refused
    r = fcrun("image", "pull", "--tls-verify=false", f"{registry}/{REPO}:multi@{pushed.index}", "pinned-multi")
    assert r.returncode == 0, r.stderr
    fcrun("image", "rm", "pinned-multi")

    before = store_state(data_root)
    r = fcrun("image", "pull", "--tls-verify=false", f"{registry}/{REPO}:multi@{WRONG}")
    assert r.returncode == 1
    assert r.stderr == (f"fcrun: pull {registry}/{REPO}:multi@{WRONG}: refused: tag 'multi' of {registry}/{REPO} "
                        f"points at {pushed.index}, not at the pinned {WRONG}\n")
    r = fcrun("image", "pull", "--tls-verify=false", f"{registry}/{REPO}@{WRONG}")
    assert r.returncode == 1
    assert r.stderr.startswith(f"fcrun: pull {registry}/{REPO}@{WRONG}: registry {registry}: reading manifest "
                               f"{WRONG} in {registry}/{REPO}: manifest unknown"), r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert store_state(data_root) == before


def test_an_unreachable_registry_is_one_clear_error_and_changes_nothing(fcrun, data_root):
    # A bound socket that does not listen: connections to its port are refused, and the port
    # stays ours while the test runs.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{closed.getsockname()[1]}"
        before = store_state(data_root)
        r = fcrun("image", "pull", "--tls-verify=false", "--timeout=60s", f"{host}/nothing/here:1")
        assert r.returncode == 1
        assert r.stderr.startswith(f"fcrun: pull {host}/nothing/here:1: registry {host}: pinging container "
                                   f"registry {host}: "), r.stderr
        assert "connection refused" in r.stderr and len(r.stderr.splitlines()) == 1
        r = fcrun("image", "pull", f"{host}/nothing/here:1")  # HTTPS by default: the same refusal
        assert r.returncode == 1 and "connection refused" in r.stderr
        assert store_state(data_root) == before


def test_app_add_pulls_its_image_on_first_use(fcrun, registry, pushed, data_root, tmp_path):
    # `app add` has no --tls-verify: registries.conf marks the registry insecure, as an admin would.
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{registry}"\ninsecure = true\n')
    env = {"CONTAINERS_REGISTRIES_CONF": str(conf)}
    ref = f"docker://{registry}/{REPO}:single"
    r = fcrun("app", "add", "pulled.test", "--image", ref, extra_env=env)
    try:
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""  # pulled quietly; no "image missing" warning
        shown = json.loads(fcrun("app", "show", "pulled.test", "--json").stdout)
        assert shown["app"]["image"] == "bb:single"
        record = json.loads(fcrun("image", "inspect", "bb:single").stdout)
        assert record["repo_digest"] == f"{registry}/{REPO}@{pushed.manifests[HOST_ARCH]}"

        # Stored now: a second app with the same reference does not ask the registry (its
        # configuration is gone, so asking would fail on TLS).
        r = fcrun("app", "add", "again.test", "--image", ref)
        assert r.returncode == 0, r.stderr
        fcrun("app", "rm", "again.test")
        r = fcrun("app", "add", "unpulled.test", "--image", f"{registry}/{REPO}:nope", extra_env=env)
        assert r.returncode == 1 and "manifest unknown" in r.stderr
        assert "unpulled.test" not in fcrun("app", "ls", "-q").stdout.split()
    finally:
        fcrun("app", "rm", "pulled.test")
        fcrun("image", "rm", "bb:single")
