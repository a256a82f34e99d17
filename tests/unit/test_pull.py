"""Registry pulls without a registry: reference parsing, skopeo's argv and messages, and the
pull's bookkeeping (digest checks, the download directory, the record) with a fake skopeo
that writes the OCI layout a real one would. tests/root/test_pull_root.py pulls for real from
a registry server on loopback."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from fcrun.errors import AlreadyExists, MissingFeature, SpecError
from fcrun.images import ImageStore
from fcrun.images.pull import (
    PULL_TMP,
    Completed,
    DigestMismatch,
    PullOptions,
    RegistryError,
    copy_argv,
    download_dir,
    ensure_image,
    platform_options,
    pull,
    run_skopeo,
    skopeo_reason,
)
from fcrun.images.reference import Reference, is_registry_reference, parse_reference
from fcrun.images.store import TMP_DIR
from fcrun.paths import Paths
from fcrun_cli.image import image as image_cli
from test_images import Entry, Layout, layer_tar

HEX_A, HEX_B = "a" * 64, "b" * 64


# -- references -----------------------------------------------------------------------------


@pytest.mark.parametrize("text,registry,repository,tag,digest,local", [
    ("busybox", "docker.io", "library/busybox", "latest", None, "busybox"),
    ("docker://busybox:1.36", "docker.io", "library/busybox", "1.36", None, "busybox:1.36"),
    ("team/app:2", "docker.io", "team/app", "2", None, "app:2"),
    ("index.docker.io/library/nginx", "docker.io", "library/nginx", "latest", None, "nginx"),
    ("localhost/app", "localhost", "app", "latest", None, "app"),
    ("127.0.0.1:5000/t/bb:multi", "127.0.0.1:5000", "t/bb", "multi", None, "bb:multi"),
    ("[::1]:5000/bb", "[::1]:5000", "bb", "latest", None, "bb"),
    (f"reg.example/a/b@sha256:{HEX_A}", "reg.example", "a/b", None, f"sha256:{HEX_A}", "b:sha256-aaaaaaaaaaaa"),
    (f"reg.example:443/b:1.0@sha256:{HEX_B}", "reg.example:443", "b", "1.0", f"sha256:{HEX_B}", "b:1.0"),
])
def test_references_parse_as_docker_reads_them(text, registry, repository, tag, digest, local):
    ref = parse_reference(text)
    assert ref == Reference(registry=registry, repository=repository, tag=tag, digest=digest)
    assert ref.local_name() == local
    assert parse_reference(str(ref)) == ref  # the printed form reads back


@pytest.mark.parametrize("text,message", [
    ("", "empty image reference"),
    ("reg.example/App:1", "invalid repository path 'App'"),
    ("reg.example/a//b", "invalid repository path 'a//b'"),
    ("reg.example/a:b:c", "invalid repository path 'a:b'"),  # the last ':' after the last '/' starts the tag
    ("reg.example/a:-x", "invalid tag '-x'"),
    ("reg.example/a@sha256:abc", "invalid digest 'sha256:abc'"),
    (f"reg.example/a@sha512:{HEX_A}", "invalid digest"),
    ("bad_host:5000/a", "invalid registry host 'bad_host:5000'"),
])
def test_bad_references_are_refused_naming_the_part(text, message):
    with pytest.raises(SpecError, match="REF") as caught:
        parse_reference(text)
    assert message in str(caught.value)


def test_a_name_too_long_for_the_store_asks_for_one():
    with pytest.raises(SpecError, match="give NAME"):
        parse_reference("reg.example/" + "a" * 70).local_name()


def test_registry_references_are_told_from_local_names():
    for text in ("reg.example/app", "team/app:1", "docker://busybox", f"busybox@sha256:{HEX_A}"):
        assert is_registry_reference(text)
    for text in ("busybox", "apache-php", "app:1.2"):
        assert not is_registry_reference(text)


# -- skopeo's argv and messages -------------------------------------------------------------


def test_copy_argv_follows_the_options():
    quiet = copy_argv("h/r@sha256:x", "oci:/t/layout:pulled", PullOptions(timeout_s=30))
    assert quiet == ["skopeo", "--command-timeout", "30s", "copy", "--quiet", "docker://h/r@sha256:x",
                     "oci:/t/layout:pulled"]
    loud = copy_argv("h/r@sha256:x", "oci:d:t", PullOptions(
        platform="linux/arm64/v8", tls_verify=False, authfile="/a.json", progress=True, registries_conf="/r.conf"))
    assert loud == ["skopeo", "--command-timeout", "600s", "--registries-conf", "/r.conf",
                    "--override-os", "linux", "--override-arch", "arm64", "--override-variant", "v8",
                    "copy", "--src-tls-verify=false", "--src-authfile", "/a.json", "docker://h/r@sha256:x", "oci:d:t"]


@pytest.mark.parametrize("platform", ["arm64", "linux/arm64/v8/x", "linux/ARM64", "linux/"])
def test_bad_platforms_are_refused(platform):
    with pytest.raises(SpecError, match="--platform"):
        platform_options(platform)


def test_registries_conf_comes_from_podmans_variable(monkeypatch):
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", "/etc/x.conf")
    assert PullOptions.from_env(progress=True) == PullOptions(registries_conf="/etc/x.conf", progress=True)
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF")
    assert PullOptions.from_env().registries_conf is None


@pytest.mark.parametrize("stderr,reason", [
    ('time="2026-12-05T10:21:20Z" level=fatal msg="initializing source docker://127.0.0.1:1/x:1: pinging '
     'container registry 127.0.0.1:1: Get \\"https://127.0.0.1:1/v2/\\": dial tcp 127.0.0.1:1: connect: '
     'connection refused"\n',
     'pinging container registry 127.0.0.1:1: Get "https://127.0.0.1:1/v2/": dial tcp 127.0.0.1:1: connect: '
     "connection refused"),
    ('time="x" level=fatal msg="Error parsing image name \\"docker://h/t:nope\\": reading manifest nope in '
     'h/t: manifest unknown: manifest unknown"\n', "reading manifest nope in h/t: manifest unknown: manifest unknown"),
    ('time="x" level=fatal msg="choosing an image from manifest list docker://h/t:multi: no image found in image '
     'index for architecture s390x, variant \\"\\", OS linux"',
     'no image found in image index for architecture s390x, variant "", OS linux'),
    ("something else\nwent wrong\n", "went wrong"),
    ("", "no message"),
])
def test_skopeos_reason_is_its_fatal_message_without_the_reference(stderr, reason):
    assert skopeo_reason(stderr) == reason


def test_a_missing_skopeo_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingFeature, match="apt-get install skopeo"):
        run_skopeo(["skopeo", "--version"], 5, False)


# -- the pull, with a fake skopeo -----------------------------------------------------------


class FakeSkopeo:
    """Answers `inspect --raw` with ``manifests[target]`` and `copy` by writing ``layout``'s
    files to the destination, as skopeo would; records every argv."""

    def __init__(self, layout: Layout, manifests: dict[str, bytes], fail: str = ""):
        self.layout, self.manifests, self.fail = layout, manifests, fail
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], timeout_s: float, stdout_to_stderr: bool) -> Completed:
        self.calls.append(argv)
        if self.fail and self.fail in argv:
            return Completed(1, b"", f'time="x" level=fatal msg="initializing source {argv[-2]}: boom"')
        if "inspect" in argv:
            target = argv[-1].removeprefix("docker://")
            if target not in self.manifests:
                return Completed(1, b"", f'level=fatal msg="reading manifest in {target}: manifest unknown"')
            return Completed(0, self.manifests[target], "")
        destination = Path(argv[-1].split(":")[1])
        destination.mkdir()
        os.system(f"cp -a {self.layout.root}/. {destination}")  # noqa: S605 (test paths)
        return Completed(0, b"", "")


@pytest.fixture
def store(tmp_path):
    return ImageStore(Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run")))


@pytest.fixture
def registry(tmp_path):
    """A layout holding one image, the manifest the registry serves for it, and its digest."""
    layout = Layout(tmp_path / "layout")
    manifest = layout.add_image([layer_tar(Entry("hello", data=b"hi\n"))], {"config": {"Cmd": ["cat", "/hello"]}},
                                ref="pulled")
    raw = json.dumps(manifest).encode()
    return layout, raw, "sha256:" + hashlib.sha256(raw).hexdigest()


def assert_nothing_left(store: ImageStore) -> None:
    assert store.list() == []
    for name in (TMP_DIR, PULL_TMP, "layers"):
        directory = os.path.join(store.paths.data_root, name)
        assert not os.path.exists(directory) or os.listdir(directory) == []


def test_a_pull_copies_the_resolved_digest_and_records_it(store, registry):
    layout, raw, digest = registry
    skopeo = FakeSkopeo(layout, {"reg.example/team/app:1": raw})
    image = pull(store, "reg.example/team/app:1", runner=skopeo)
    assert image.name == "app:1" and image.config.cmd == ["cat", "/hello"]
    assert image.source == f"docker://reg.example/team/app:1@{digest}"
    assert image.repo_digest == f"reg.example/team/app@{digest}"
    assert store.get("app:1").repo_digest == image.repo_digest  # on disk too
    inspect, copy = skopeo.calls
    assert inspect[-1] == "docker://reg.example/team/app:1"
    assert copy[-2] == f"docker://reg.example/team/app@{digest}"  # by digest: a moved tag cannot interfere
    assert os.listdir(os.path.join(store.paths.data_root, PULL_TMP)) == []


def test_a_pinned_digest_the_tag_does_not_point_at_is_refused_naming_both(store, registry):
    layout, raw, digest = registry
    skopeo = FakeSkopeo(layout, {"reg.example/app:1": raw})
    with pytest.raises(DigestMismatch) as caught:
        pull(store, f"reg.example/app:1@sha256:{HEX_A}", runner=skopeo)
    assert str(caught.value) == (f"pull reg.example/app:1@sha256:{HEX_A}: refused: tag '1' of reg.example/app "
                                 f"points at {digest}, not at the pinned sha256:{HEX_A}")
    assert len(skopeo.calls) == 1  # nothing copied
    assert_nothing_left(store)


def test_a_registry_answering_other_content_for_a_digest_is_refused(store, registry):
    layout, raw, digest = registry
    skopeo = FakeSkopeo(layout, {f"reg.example/app@sha256:{HEX_A}": raw})
    with pytest.raises(DigestMismatch, match=f"hashing to {digest} for the pinned sha256:{HEX_A}"):
        pull(store, f"reg.example/app@sha256:{HEX_A}", runner=skopeo)
    assert_nothing_left(store)


def test_a_failed_copy_leaves_nothing(store, registry):
    layout, raw, _ = registry
    skopeo = FakeSkopeo(layout, {"reg.example/app:1": raw}, fail="copy")
    with pytest.raises(RegistryError, match=r"^pull reg.example/app:1: registry reg.example: boom$"):
        pull(store, "reg.example/app:1", runner=skopeo)
    assert_nothing_left(store)


def test_a_bad_image_from_the_registry_leaves_nothing(store, registry, tmp_path):
    layout, raw, _ = registry
    for blob in (layout.root / "blobs" / "sha256").iterdir():
        if blob.stat().st_size > 300:  # the gzipped layer: corrupt it
            blob.write_bytes(b"not gzip")
    with pytest.raises(SpecError):
        pull(store, "reg.example/app:1", runner=FakeSkopeo(layout, {"reg.example/app:1": raw}))
    assert_nothing_left(store)


def test_app_add_pulls_only_what_is_not_stored_at_the_pinned_digest(store, registry):
    layout, raw, digest = registry
    skopeo = FakeSkopeo(layout, {"reg.example/app:1": raw, f"reg.example/app@{digest}": raw})
    assert ensure_image(store, "apache-php", runner=skopeo) == "apache-php"  # a local name: as it is
    assert ensure_image(store, "reg.example/app:1", runner=skopeo) == "app:1"
    assert len(skopeo.calls) == 2
    assert ensure_image(store, "docker://reg.example/app:1", runner=skopeo) == "app:1"
    assert ensure_image(store, f"reg.example/app:1@{digest}", runner=skopeo) == "app:1"
    assert len(skopeo.calls) == 2  # stored already, at that digest: no registry call
    with pytest.raises(DigestMismatch):  # pinned elsewhere: asks the registry, which refuses
        ensure_image(store, f"reg.example/app:1@sha256:{HEX_A}", runner=skopeo)


def test_app_add_neither_replaces_nor_uses_a_same_named_image_from_elsewhere(store, registry, tmp_path):
    layout, raw, _ = registry
    store.import_(str(layout.root), "app:1")  # as if built or imported locally
    skopeo = FakeSkopeo(layout, {"reg.example/app:1": raw})
    with pytest.raises(AlreadyExists, match=r"image 'app:1' in the store is not from reg.example/app \(its source: "
                                            r".*\): pull it under another name"):
        ensure_image(store, "reg.example/app:1", runner=skopeo)
    assert skopeo.calls == [] and store.get("app:1").repo_digest == ""
    pull(store, "other.example/app:1", runner=FakeSkopeo(layout, {"other.example/app:1": raw}))
    with pytest.raises(AlreadyExists, match="not from reg.example/app"):  # another registry's, same name
        ensure_image(store, "reg.example/app:1", runner=skopeo)


def test_abandoned_downloads_are_removed_and_live_ones_kept(tmp_path):
    parent = tmp_path / PULL_TMP
    parent.mkdir()
    (parent / "pull-dead").mkdir()
    (parent / "pull-dead" / "blob").write_text("x")
    (parent / "pull-dead.lock").write_text("")  # its process died: the flock went with it
    (parent / "pull-nolock").mkdir()  # killed between removing the lock... and the directory
    live = os.open(parent / "pull-live.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(live, fcntl.LOCK_EX)
    (parent / "pull-live").mkdir()
    try:
        with download_dir(str(tmp_path)) as work:
            assert sorted(os.listdir(parent)) == sorted(
                ["pull-live", "pull-live.lock", os.path.basename(work), os.path.basename(work) + ".lock"])
        assert sorted(os.listdir(parent)) == ["pull-live", "pull-live.lock"]
    finally:
        os.close(live)


def test_the_cli_prints_name_id_and_digest_and_reports_errors_in_one_line(tmp_path, monkeypatch, registry):
    layout, raw, digest = registry
    skopeo = FakeSkopeo(layout, {"reg.example/app:1": raw})
    monkeypatch.setattr("fcrun.images.pull.run_skopeo", skopeo)
    monkeypatch.setenv("FCRUN_ROOT", str(tmp_path / "data"))
    runner = CliRunner()
    result = runner.invoke(image_cli, ["pull", "--tls-verify=false", "reg.example/app:1"])
    assert result.exit_code == 0, result.output
    name, image_id, repo_digest = result.stdout.split()
    assert (name, repo_digest) == ("app:1", f"reg.example/app@{digest}")
    assert "--tls-verify=false" in skopeo.calls[0] and "--src-tls-verify=false" in skopeo.calls[1]
    assert "--quiet" in skopeo.calls[1]  # stderr is not a terminal here
    result = runner.invoke(image_cli, ["pull", "reg.example/app:2"])
    assert result.exit_code == 1
    assert result.stderr == "fcrun: pull reg.example/app:2: registry reg.example: reading manifest in " \
                            "reg.example/app:2: manifest unknown\n"
