"""The image store without root: names, recipes and the build cache, OCI import and its
refusal of hostile input, remove, and the CLI.

Images here are made by the tests themselves (tarfile + hashlib). Overlay whiteouts need
CAP_MKNOD and trusted.* xattrs, so the store gets a recording ``OverlayMarks`` here; the real
whiteouts are tested as root in tests/root/test_images_root.py.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from click.testing import CliRunner

from fcrun.errors import IncorrectStatus, KernelError, NotFound, SpecError
from fcrun.images import BuildFailed, ImageConfig, ImageStore, parse_name
from fcrun.images.layer import HashingReader, LayerExtractor
from fcrun.images.limits import ImportBudget, ImportLimitExceeded, ImportLimits
from fcrun.images.oci import host_platform, name_from_reference
from fcrun.images.recipes import exists_in_root, find_recipe, load_config, recipe_hash
from fcrun.images.store import TMP_DIR
from fcrun.paths import Paths
from fcrun_cli.image import image as image_cli

OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
MTIME = 1_700_000_000


# -- building test images -------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    kind: str = "f"  # f file, d dir, l symlink, h hard link, c char dev, b block dev, p fifo
    data: bytes = b""
    link: str = ""
    mode: int | None = None
    uid: int = 0
    dev: tuple[int, int] = (0, 0)


def layer_tar(*entries: Entry) -> bytes:
    kinds = {
        "f": tarfile.REGTYPE,
        "d": tarfile.DIRTYPE,
        "l": tarfile.SYMTYPE,
        "h": tarfile.LNKTYPE,
        "c": tarfile.CHRTYPE,
        "b": tarfile.BLKTYPE,
        "p": tarfile.FIFOTYPE,
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = kinds[e.kind]
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "d" else 0o644)
            info.uid = info.gid = e.uid
            info.mtime = MTIME
            info.linkname = e.link
            info.devmajor, info.devminor = e.dev
            if e.kind == "f":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Layout:
    """An OCI image layout being written into ``root``."""

    root: Path
    manifests: list[dict] = field(default_factory=list)  # descriptors in index.json
    images: list[dict] = field(default_factory=list)  # the manifests themselves

    def blob(self, data: bytes, media_type: str) -> dict:
        blobs = self.root / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
        return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

    def add_image(
        self,
        layers: list[bytes],
        config: dict | None = None,
        ref: str | None = None,
        media_type: str = OCI_GZIP,
        platform: dict | None = None,
    ) -> dict:
        config = {"architecture": "amd64", "os": "linux", **(config or {})}
        config["rootfs"] = {"type": "layers", "diff_ids": [sha256(t) for t in layers]}
        blobs = [
            self.blob(gzip.compress(t, mtime=0) if media_type.endswith("gzip") else t, media_type)
            for t in layers
        ]
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": self.blob(
                json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
            ),
            "layers": blobs,
        }
        desc = self.blob(
            json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json"
        )
        if ref:
            desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
        if platform:
            desc["platform"] = platform
        self.manifests.append(desc)
        self.images.append(manifest)
        self.write_index()
        return manifest

    def write_index(self) -> None:
        (self.root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.manifests})
        )

    def archive(self, path: Path) -> Path:
        with tarfile.open(path, "w") as tar:
            for child in sorted(self.root.iterdir()):
                tar.add(child, arcname=child.name)
        return path


def docker_archive(path: Path, layers: list[bytes], config: dict, repo_tags: list[str]) -> Path:
    """What `docker save` wrote before docker 25: <hex>.json config, <id>/layer.tar layers."""
    config = {
        "architecture": "amd64",
        "os": "linux",
        **config,
        "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in layers]},
    }
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    files = {config_name: config_bytes}
    layer_paths = []
    for i, data in enumerate(layers):
        layer_paths.append(f"{i:064x}/layer.tar")
        files[layer_paths[-1]] = data
    files["manifest.json"] = json.dumps(
        [{"Config": config_name, "RepoTags": repo_tags, "Layers": layer_paths}]
    ).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class RecordingMarks:
    """Stands in for mknod/setxattr: records whiteouts and opaque dirs relative to the layer."""

    def __init__(self) -> None:
        self.whiteouts: list[str] = []
        self.opaque_dirs: list[str] = []

    @staticmethod
    def _dir(fd: int) -> str:
        """The directory's path inside the layer being extracted (.image-tmp/layer-*/...)."""
        path = os.readlink(f"/proc/self/fd/{fd}")
        return path.split(f"/{TMP_DIR}/", 1)[1].partition("/")[2]

    def whiteout(self, dir_fd: int, name: str) -> None:
        self.whiteouts.append(os.path.join(self._dir(dir_fd), name))
        # a placeholder, so a later member with the same name replaces it like a real whiteout
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o000, dir_fd=dir_fd))

    def opaque(self, dir_fd: int) -> None:
        self.opaque_dirs.append(self._dir(dir_fd))


@pytest.fixture
def marks():
    return RecordingMarks()


@pytest.fixture
def paths(tmp_path):
    return Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run"))


@pytest.fixture
def recipes(tmp_path):
    root = tmp_path / "recipes"
    root.mkdir()
    return root


@pytest.fixture
def store(paths, recipes, marks):
    return ImageStore(paths, recipes_dir=str(recipes), marks=marks)


def assert_store_clean(store: ImageStore) -> None:
    """No record, no layer, no leftover work: what a failed build or import must leave."""
    assert store.list() == []
    for directory in (store.paths.layers, os.path.join(store.paths.data_root, TMP_DIR)):
        assert not os.path.exists(directory) or os.listdir(directory) == []


def write_recipe(
    recipes: Path, name: str, script: str, config: str = 'cmd = ["/bin/tool"]\n'
) -> Path:
    directory = recipes / name
    directory.mkdir(exist_ok=True)
    (directory / "build.sh").write_text(script)
    (directory / "image.toml").write_text(config)
    return directory


COUNTING_SCRIPT = """\
echo "run" >> "$BUILD_COUNTER"
mkdir -p "$ROOTFS/bin"
echo tool > "$ROOTFS/bin/tool"
echo "wrote tool"
"""


# -- names and configs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,canonical",
    [
        ("busybox", "busybox"),
        ("apache-php", "apache-php"),
        ("a", "a"),
        ("nginx:1.25", "nginx:1.25"),
        ("nginx:latest", "nginx"),
        ("x.y_z-1:V2_rc.1", "x.y_z-1:V2_rc.1"),
        ("a" * 63, "a" * 63),
    ],
)
def test_valid_names(name, canonical):
    assert parse_name(name) == canonical


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Busybox",
        "-x",
        ".x",
        "_x",
        "a/b",
        "../x",
        "a" * 64,
        "x:",
        "x:-tag",
        "x:a:b",
        "x y",
        "x\0",
    ],
)
def test_bad_names_are_spec_errors(name):
    with pytest.raises(SpecError, match="invalid image"):
        parse_name(name)


def test_names_from_references():
    assert name_from_reference("docker.io/library/nginx:1.25@sha256:" + "0" * 64) == "nginx:1.25"
    assert name_from_reference("localhost:5000/team/App:latest") == "app"
    with pytest.raises(SpecError):
        name_from_reference("registry/bad_name!:x")


def test_image_config_checks_and_normalizes():
    config = msgspec.convert(
        {"stop_signal": "winch", "exposed_ports": [80], "env": ["A=1"]}, ImageConfig
    )
    assert config.stop_signal == "SIGWINCH"
    assert ImageConfig(stop_signal="15").stop_signal == "SIGTERM"
    for bad in (
        {"env": ["NOEQUALS"]},
        {"exposed_ports": [70000]},
        {"workdir": "rel"},
        {"stop_signal": "SIGNOPE"},
        {"entrypont": ["x"]},
    ):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, ImageConfig)


def test_exists_in_root_resolves_symlinks_inside_the_root(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/tool").write_text("")
    (tmp_path / "bin").symlink_to("/usr/bin")  # absolute: must mean <root>/usr/bin, not the host's
    (tmp_path / "loop").symlink_to("loop")
    assert exists_in_root(str(tmp_path), "/bin/tool")
    assert not exists_in_root(
        str(tmp_path), "/bin/sh"
    )  # the host has /usr/bin/sh; the root does not
    assert not exists_in_root(str(tmp_path), "/loop/x")


# -- recipes and builds -----------------------------------------------------------------------


def test_recipe_hash_covers_names_contents_and_exec_bits(recipes):
    directory = write_recipe(recipes, "r", "true\n")
    recipe = find_recipe(str(recipes), "r")
    first = recipe_hash(recipe)
    assert recipe_hash(recipe) == first
    (directory / "build.sh").chmod(0o755)
    assert recipe_hash(recipe) != first
    (directory / "build.sh").chmod(0o644)
    assert recipe_hash(recipe) == first
    (directory / "extra.conf").write_text("x")
    second = recipe_hash(recipe)
    assert second != first
    (directory / "extra.conf").rename(directory / "other.conf")
    assert recipe_hash(recipe) != second


def test_bad_image_toml_is_located(recipes):
    write_recipe(recipes, "r", "true\n", config='entrypoint = ["/x"]\nexposed_port = [80]\n')
    with pytest.raises(SpecError, match=r"unknown field `exposed_port`.*image\.toml"):
        load_config(find_recipe(str(recipes), "r"))


def test_build_caches_by_recipe_hash(store, recipes, tmp_path, monkeypatch):
    counter = tmp_path / "count"
    monkeypatch.setenv("BUILD_COUNTER", str(counter))
    directory = write_recipe(recipes, "tool", COUNTING_SCRIPT)
    lines: list[str] = []
    image = store.build("tool", progress=lines.append)
    assert "[tool] wrote tool" in lines
    assert (
        image.name == "tool"
        and image.config.cmd == ["/bin/tool"]
        and image.id.startswith("sha256:")
    )
    assert Path(image.layers[0], "bin/tool").read_text() == "tool\n"
    assert stat.S_IMODE(os.stat(image.layers[0]).st_mode) == 0o755
    assert image.size_bytes == 5
    assert store.get("tool") == image

    lines.clear()
    assert store.build("tool", progress=lines.append) == image
    assert counter.read_text() == "run\n" and "up to date" in lines[0]

    store.build("tool", rebuild=True)
    assert counter.read_text() == "run\nrun\n"
    (directory / "build.sh").write_text(COUNTING_SCRIPT + "echo changed\n")
    latest = store.build("tool")
    assert counter.read_text() == "run\nrun\nrun\n"
    # Each build made a new layer (new mtimes, new digest); the old ones stay for containers
    # still running on them until pruned.
    assert len(os.listdir(store.paths.layers)) == 3
    assert len(store.prune()) == 2 and os.listdir(store.paths.layers) == [
        os.path.basename(latest.layers[0])
    ]


def test_failed_build_leaves_nothing(store, recipes):
    write_recipe(recipes, "broken", 'mkdir -p "$ROOTFS/bin"; echo "half done"; false; echo never\n')
    with pytest.raises(BuildFailed, match=r"exited with status 1(.|\n)*half done"):
        store.build("broken")
    assert_store_clean(store)


def test_build_checks_the_entrypoint_exists(store, recipes):
    write_recipe(
        recipes,
        "noentry",
        'mkdir -p "$ROOTFS/etc"\n',
        config='entrypoint = ["/usr/sbin/apache2"]\n',
    )
    with pytest.raises(BuildFailed, match="/usr/sbin/apache2"):
        store.build("noentry")
    assert_store_clean(store)


def test_bad_config_fails_before_building(store, recipes, tmp_path, monkeypatch):
    monkeypatch.setenv("BUILD_COUNTER", str(tmp_path / "count"))
    write_recipe(recipes, "badcfg", COUNTING_SCRIPT, config='stop_signal = "SIGNOPE"\n')
    with pytest.raises(SpecError, match="SIGNOPE"):
        store.build("badcfg")
    assert not (tmp_path / "count").exists()


def test_unknown_recipe_and_missing_image(store, recipes):
    write_recipe(recipes, "known", "true\n")
    with pytest.raises(NotFound, match=r"no recipe 'nope'.*recipes: known"):
        store.build("nope")
    with pytest.raises(NotFound, match=r"build it with `fcrun image build known`"):
        store.get("known")
    with pytest.raises(NotFound, match="fcrun image import"):
        store.get("other")
    with pytest.raises(SpecError):
        store.build("../etc")


def test_shipped_recipes_are_valid():
    root = Path(__file__).resolve().parents[2] / "rootfs"
    for name in ("busybox", "apache-php"):
        config = load_config(find_recipe(str(root), name))
        assert config.entrypoint or config.cmd
    apache = load_config(find_recipe(str(root), "apache-php"))
    assert apache.exposed_ports == [80] and apache.stop_signal == "SIGWINCH"
    assert apache.docroot == "/var/www/html"


# -- import -----------------------------------------------------------------------------------


BASE = layer_tar(
    Entry("./", "d"),
    Entry("bin", "d"),
    Entry("bin/tool", data=b"#!/bin/sh\n", mode=0o4755),
    Entry("bin/tool-link", "h", link="bin/tool"),
    Entry("bin/sh", "l", link="/bin/tool"),
    Entry("etc", "d"),
    Entry("etc/keep", data=b"keep"),
    Entry("etc/gone", data=b"gone"),
    Entry("etc/conf.d", "d", mode=0o750),
    Entry("etc/conf.d/a", data=b"a"),
    Entry("run/fifo", "p"),  # no "run" entry first: created on the way
    Entry("var/www", "d", uid=33),
    Entry("var/www/index.php", data=b"<?php phpinfo();", uid=33),
)
TOP = layer_tar(
    Entry("etc", "d"),
    Entry("etc/.wh.gone"),
    Entry("etc/conf.d", "d", mode=0o750),
    Entry("etc/conf.d/.wh..wh..opq"),
    Entry("etc/conf.d/b", data=b"b"),
    Entry("etc/keep", data=b"kept, changed"),
)
CONFIG = {
    "config": {
        "Entrypoint": ["/bin/tool"],
        "Cmd": ["-x"],
        "Env": ["PATH=/bin", "A=b=c"],
        "WorkingDir": "/var/www",
        "User": "33:33",
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080": {}},
        "StopSignal": "SIGQUIT",
    }
}


@pytest.fixture
def layout(tmp_path):
    layout = Layout(tmp_path / "layout")
    layout.add_image([BASE, TOP], CONFIG, ref="example.org/team/webapp:1.0")
    return layout


def test_import_oci_layout(store, layout, marks):
    progress: list[str] = []
    image = store.import_(str(layout.root), progress=progress.append)
    assert image.name == "webapp:1.0"
    assert image.config == ImageConfig(
        entrypoint=["/bin/tool"],
        cmd=["-x"],
        env=["PATH=/bin", "A=b=c"],
        workdir="/var/www",
        user="33:33",
        exposed_ports=[80, 8080],
        stop_signal="SIGQUIT",
    )
    base, top = image.layers
    assert image.diff_ids == [sha256(BASE), sha256(TOP)]
    assert base == os.path.join(store.paths.layers, sha256(BASE)[7:])
    assert image.id == layout.images[0]["config"]["digest"]

    tool = os.lstat(os.path.join(base, "bin/tool"))
    assert stat.S_IMODE(tool.st_mode) == 0o4755 and tool.st_nlink == 2 and tool.st_mtime == MTIME
    assert os.readlink(os.path.join(base, "bin/sh")) == "/bin/tool"
    assert stat.S_ISFIFO(os.lstat(os.path.join(base, "run/fifo")).st_mode)
    assert stat.S_IMODE(os.stat(os.path.join(base, "etc/conf.d")).st_mode) == 0o750
    assert os.stat(os.path.join(base, "etc")).st_mtime == MTIME  # set after its children
    if os.geteuid() == 0:
        assert os.stat(os.path.join(base, "var/www/index.php")).st_uid == 33
    assert Path(base, "etc/gone").read_bytes() == b"gone"  # lower layers are never changed

    assert marks.whiteouts == ["etc/gone"]
    assert marks.opaque_dirs == ["etc/conf.d"]
    assert Path(top, "etc/keep").read_bytes() == b"kept, changed"
    assert sorted(os.listdir(os.path.join(top, "etc/conf.d"))) == ["b"]
    assert image.size_bytes == len(
        b"#!/bin/sh\n" b"keepgone" b"a" b"<?php phpinfo();" b"b" b"kept, changed"
    )
    assert store.list() == [image] and store.get("webapp:1.0") == image
    assert any("extracting" in line for line in progress)


def test_import_oci_archive_and_reimport_reuses_layers(store, layout, tmp_path):
    archive = layout.archive(tmp_path / "webapp.tar")
    first = store.import_(str(archive), "first")
    second = store.import_(str(layout.root), "second")
    assert first.layers == second.layers and first.id == second.id
    assert len(os.listdir(store.paths.layers)) == 2
    assert [i.name for i in store.list()] == ["first", "second"]


def test_import_uncompressed_layers_and_docker_archive(store, tmp_path):
    layout = Layout(tmp_path / "plain")
    layout.add_image([BASE], media_type=OCI_TAR)
    assert store.import_(str(layout.root)).name == "plain"  # no annotation: the directory's name

    archive = docker_archive(
        tmp_path / "saved.tar", [BASE, TOP], CONFIG, ["docker.io/library/webapp:2"]
    )
    image = store.import_(str(archive))
    assert image.name == "webapp:2" and image.config.user == "33:33"
    assert image.layers[0] == store.get("plain").layers[0]  # same base layer, stored once


def test_docker_archive_layers_are_checked_against_diff_ids(store, tmp_path):
    """Legacy docker-archives name layers by id, not digest: the config's diff_ids check them,
    also when the layer is already stored and nothing is extracted."""
    store.import_(str(docker_archive(tmp_path / "good.tar", [BASE], {}, ["good"])))
    forged = docker_archive(tmp_path / "forged.tar", [BASE], {}, ["forged"])
    with tarfile.open(forged) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    layer_name = next(n for n in members if n.endswith("layer.tar"))
    members[layer_name] = layer_tar(Entry("evil", data=b"x"))
    with tarfile.open(forged, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SpecError, match="uncompressed content hashes to .* the image config says"):
        store.import_(str(forged))
    assert [i.name for i in store.list()] == ["good"]


def test_import_picks_the_host_platform(store, tmp_path):
    layout = Layout(tmp_path / "multi")
    arch = host_platform().split("/")[1]
    layout.add_image(
        [layer_tar(Entry("other"))], platform={"os": "linux", "architecture": "s390x-not-this"}
    )
    layout.add_image([layer_tar(Entry("mine"))], platform={"os": "linux", "architecture": arch})
    image = store.import_(str(layout.root), "multi")
    assert os.listdir(image.layers[0]) == ["mine"]

    other = Layout(tmp_path / "foreign")
    other.add_image([layer_tar(Entry("x"))], platform={"os": "linux", "architecture": "mips"})
    other.add_image([layer_tar(Entry("y"))], platform={"os": "linux", "architecture": "sparc"})
    with pytest.raises(SpecError, match="no image for this host's platform"):
        store.import_(str(other.root), "foreign")


def test_duplicate_layers_are_stacked_once(store, tmp_path):
    empty = layer_tar()
    layout = Layout(tmp_path / "dup")
    layout.add_image([empty, layer_tar(Entry("a")), empty])
    image = store.import_(str(layout.root))
    assert image.diff_ids == [sha256(layer_tar(Entry("a"))), sha256(empty)]


# -- hostile or broken input ------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    directory = tmp_path / "outside"
    directory.mkdir()
    return directory


def import_layer(store: ImageStore, tmp_path: Path, layer: bytes, **kwargs) -> None:
    layout = Layout(tmp_path / "bad")
    layout.add_image([layer], **kwargs)
    store.import_(str(layout.root), "bad")


@pytest.mark.parametrize(
    "entries,message",
    [
        ([Entry("../escape", data=b"x")], r"member '\.\./escape'.*escapes the layer with '\.\.'"),
        ([Entry("a/../../escape", data=b"x")], r"escapes the layer"),
        ([Entry("/etc/escape", data=b"x")], r"member '/etc/escape'.*absolute path"),
        (
            [Entry("link", "l", link="{outside}"), Entry("link/pwned", data=b"x")],
            r"member 'link/pwned': 'link' is a symlink; refusing to write through it",
        ),
        (
            [
                Entry("d", "d"),
                Entry("d/link", "l", link="../../../.."),
                Entry("d/link/tmp/pwned", data=b"x"),
            ],
            r"'d/link' is a symlink",
        ),
        ([Entry("link", "l", link="{outside}"), Entry("link/sub", "d")], r"'link' is a symlink"),
        ([Entry("passwd", "h", link="../../../etc/passwd")], r"member 'passwd'.*escapes the layer"),
        ([Entry("passwd", "h", link="/etc/passwd")], r"hard link to absolute path '/etc/passwd'"),
        ([Entry("l", "l", link="{outside}"), Entry("x", "h", link="l/file")], r"'l' is a symlink"),
        ([Entry("x", "h", link="missing")], r"hard link target 'missing' is not in this layer"),
        (
            [Entry("dev/sda", "b", dev=(8, 0))],
            r"member 'dev/sda': block device 8:0: device nodes are not allowed",
        ),
        ([Entry("dev/null", "c", dev=(1, 3))], r"member 'dev/null': character device 1:3"),
    ],
)
def test_unsafe_members_are_refused(store, tmp_path, outside, entries, message):
    for e in entries:
        e.link = e.link.format(outside=outside)
    with pytest.raises(SpecError, match=message):
        import_layer(store, tmp_path, layer_tar(*entries))
    assert os.listdir(outside) == []
    assert not os.path.exists(tmp_path / "escape")
    assert_store_clean(store)


def test_digest_mismatch(store, layout):
    layer_desc = layout.images[0]["layers"][0]
    blob = layout.root / "blobs/sha256" / layer_desc["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0xFF  # same size, different content
    blob.write_bytes(bytes(data))
    with pytest.raises(
        SpecError, match=rf"blob blobs/sha256/{layer_desc['digest'][7:]}: digest mismatch"
    ):
        store.import_(str(layout.root))
    assert_store_clean(store)


def test_size_mismatch_and_missing_blob(store, layout):
    blobs = sorted((layout.root / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    biggest = blobs[-1]
    biggest.write_bytes(biggest.read_bytes() + b"\0")
    with pytest.raises(SpecError, match="size is .* bytes, its descriptor says"):
        store.import_(str(layout.root))
    biggest.unlink()
    with pytest.raises(SpecError, match="is missing"):
        store.import_(str(layout.root))
    assert_store_clean(store)


def test_diff_id_mismatch(store, tmp_path):
    layout = Layout(tmp_path / "liar")
    manifest = layout.add_image([BASE])
    config_path = layout.root / "blobs/sha256" / manifest["config"]["digest"][7:]
    config = json.loads(config_path.read_text())
    config["rootfs"]["diff_ids"] = [sha256(b"something else")]
    manifest["config"] = layout.blob(
        json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"
    )
    layout.manifests = [
        layout.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    ]
    layout.write_index()
    with pytest.raises(SpecError, match="uncompressed content hashes to .* the image config says"):
        store.import_(str(layout.root))
    assert_store_clean(store)


def test_truncated_archive(store, layout, tmp_path):
    archive = layout.archive(tmp_path / "full.tar")
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        last = max(tar.getmembers(), key=lambda m: m.offset_data)
    # in the first header, in the middle, in the last member's data (the rest is zero padding)
    for cut in (300, len(data) // 2, last.offset_data + last.size // 2):
        truncated = tmp_path / "truncated.tar"
        truncated.write_bytes(data[:cut])
        with pytest.raises(SpecError, match="truncated|missing|not a readable tar|read failed"):
            store.import_(str(truncated), "webapp")
        assert_store_clean(store)


def test_truncated_layer(store, tmp_path):
    """A layer whose compressed stream ends early, though its (lying) descriptor matches it."""
    for media_type, cut in ((OCI_GZIP, 0.6), (OCI_TAR, 0.5)):
        layout = Layout(tmp_path / f"cut-{media_type[-4:]}")
        manifest = layout.add_image([BASE], media_type=media_type)
        blob = layout.root / "blobs/sha256" / manifest["layers"][0]["digest"][7:]
        short = blob.read_bytes()[: int(blob.stat().st_size * cut)]
        blob.unlink()
        manifest["layers"][0] = layout.blob(short, media_type)
        layout.manifests = [
            layout.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
        ]
        layout.write_index()
        with pytest.raises(SpecError, match="truncated or corrupt"):
            store.import_(str(layout.root), "cut")
        assert_store_clean(store)


@pytest.mark.parametrize(
    "media_type,message",
    [
        ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd-compressed layers"),
        ("application/x-tar-but-not", "unknown layer media type 'application/x-tar-but-not'"),
    ],
)
def test_unknown_media_type(store, tmp_path, media_type, message):
    with pytest.raises(SpecError, match=message):
        import_layer(store, tmp_path, BASE, media_type=media_type)
    assert_store_clean(store)


def test_not_an_image_and_bad_name(store, layout, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="not an OCI layout"):
        store.import_(str(tmp_path / "empty"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SpecError, match="not a readable tar"):
        store.import_(str(tmp_path / "junk.tar"))
    with pytest.raises(SpecError, match="invalid image name 'Bad/Name'"):
        store.import_(str(layout.root), "Bad/Name")
    with pytest.raises(SpecError, match="cannot derive an image name"):
        Layout(tmp_path / "Not A Name!").add_image([BASE])
        store.import_(str(tmp_path / "Not A Name!"))
    assert_store_clean(store)


@pytest.mark.parametrize("port", ["\u00b2/tcp", "9" * 5000 + "/tcp"])
def test_an_image_whose_exposed_port_is_no_plain_number_is_refused_by_name(store, tmp_path, port):
    """"²" passed str.isdigit and then failed int() (a traceback), as did 5,000 digits."""
    layout = Layout(tmp_path / "layout")
    layout.add_image([BASE], {"config": {**CONFIG["config"], "ExposedPorts": {port: {}}}}, ref="example.org/p:1")
    with pytest.raises(SpecError, match="bad exposed port") as info:
        store.import_(str(layout.root))
    assert info.value.where == "$.config.ExposedPorts"
    assert_store_clean(store)


# -- list, inspect, remove --------------------------------------------------------------------


def test_remove_keeps_shared_layers_and_refuses_when_in_use(store, tmp_path):
    shared = layer_tar(Entry("shared", data=b"s"))
    a, b = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    a.add_image([shared, layer_tar(Entry("only-a"))])
    b.add_image([shared, layer_tar(Entry("only-b"))])
    image_a, image_b = store.import_(str(a.root)), store.import_(str(b.root))
    assert image_a.layers[0] == image_b.layers[0]
    assert len(os.listdir(store.paths.layers)) == 3

    with pytest.raises(
        IncorrectStatus, match=r"image 'a' is in use by container\(s\) web-1, web-2"
    ):
        store.remove("a", in_use=lambda image: ["web-2", "web-1"] if image.name == "a" else [])
    assert store.get("a") == image_a

    assert store.remove("a", in_use=lambda image: []) == image_a
    assert [i.name for i in store.list()] == ["b"]
    assert os.path.isdir(image_b.layers[0]) and not os.path.exists(image_a.layers[1])
    with pytest.raises(NotFound):
        store.remove("a")
    store.remove("b")
    assert os.listdir(store.paths.layers) == []


def test_prune_removes_unreferenced_layers_except_kept_ones(store, tmp_path):
    one = Layout(tmp_path / "one")
    one.add_image([layer_tar(Entry("v1"))])
    old = store.import_(str(one.root), "app")
    two = Layout(tmp_path / "two")
    two.add_image([layer_tar(Entry("v2"))])
    new = store.import_(str(two.root), "app")  # replaces the record, keeps old layers
    assert store.get("app") == new and os.path.isdir(old.layers[0])
    assert store.prune(keep_layers=old.layers) == []
    assert store.prune() == old.layers
    assert os.path.isdir(new.layers[0])


def test_stale_tmp_is_cleared_by_the_next_writer(store, tmp_path):
    stale = Path(store.paths.data_root, TMP_DIR, "layer-crashed")
    stale.mkdir(parents=True)
    (stale / "half").write_text("x")
    layout = Layout(tmp_path / "l")
    layout.add_image([BASE])
    store.import_(str(layout.root), "x")
    assert os.listdir(os.path.join(store.paths.data_root, TMP_DIR)) == []


# -- CLI --------------------------------------------------------------------------------------


def test_cli(paths, recipes, tmp_path, monkeypatch):
    monkeypatch.setenv("FCRUN_RECIPES", str(recipes))
    monkeypatch.setenv("BUILD_COUNTER", str(tmp_path / "count"))
    write_recipe(recipes, "tool", COUNTING_SCRIPT)
    using: list[str] = []
    obj = SimpleNamespace(paths=paths, image_in_use=lambda image: list(using))
    runner = CliRunner()

    result = runner.invoke(image_cli, ["build", "tool"], obj=obj)
    assert result.exit_code == 0, result.output
    assert "[tool] wrote tool" in result.output and "tool sha256:" in result.output
    result = runner.invoke(image_cli, ["build", "tool", "--rebuild"], obj=obj)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "count").read_text() == "run\nrun\n"

    result = runner.invoke(image_cli, ["ls"], obj=obj)
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "CREATED", "SOURCE"] and row.startswith("tool ")

    result = runner.invoke(image_cli, ["inspect", "tool"], obj=obj)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["config"]["cmd"] == ["/bin/tool"]

    using.append("web-1")
    result = runner.invoke(image_cli, ["rm", "tool"], obj=obj)
    assert result.exit_code == IncorrectStatus.exit_code and "web-1" in result.output
    using.clear()
    result = runner.invoke(image_cli, ["rm", "tool"], obj=obj)
    assert result.exit_code == 0, result.output

    result = runner.invoke(image_cli, ["inspect", "tool"], obj=obj)
    assert result.exit_code == NotFound.exit_code and "fcrun image build tool" in result.output
    layout = Layout(tmp_path / "layout")  # no whiteouts: the CLI's store writes real ones
    layout.add_image([BASE], CONFIG, ref="example.org/team/webapp:1.0")
    result = runner.invoke(image_cli, ["import", str(layout.root), "Bad Name"], obj=obj)
    assert result.exit_code == SpecError.exit_code and "invalid image name" in result.output
    result = runner.invoke(image_cli, ["import", str(layout.root)], obj=obj)
    assert result.exit_code == 0, result.output
    assert "webapp:1.0 sha256:" in result.output


def test_cli_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FCRUN_ROOT", str(tmp_path / "env-root"))
    result = CliRunner().invoke(image_cli, ["ls", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == []


# -- import caps, counted while streaming -----------------------------------------------------


def gzip_zeros_bomb(tar_header: bytes, zero_mib: int) -> bytes:
    """A gzip stream of ``tar_header`` and then ``zero_mib`` MiB of zeros, made cheaply: gzip
    members may be concatenated, so one compressed MiB of zeros is repeated."""
    one_mib = gzip.compress(b"\0" * (1 << 20), mtime=0)
    return gzip.compress(tar_header, mtime=0) + one_mib * zero_mib


def big_file_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MTIME
    return info.tobuf(format=tarfile.PAX_FORMAT)


def import_blob(store: ImageStore, tmp_path: Path, blob: bytes, limits=None, diff_id=None):
    """An OCI layout whose single layer blob is ``blob`` (gzip), imported as "bomb"."""
    layout = Layout(tmp_path / "bomb")
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [diff_id or sha256(b"unknown")]}}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": layout.blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [layout.blob(blob, OCI_GZIP)],
    }
    layout.manifests = [
        layout.blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    ]
    layout.write_index()
    return store.import_(str(layout.root), "bomb", limits=limits)


def test_a_gzip_bomb_stops_at_the_layer_cap_while_streaming(tmp_path):
    """2 GiB of zeros in 2 MiB of gzip: the extractor stops once the cap is crossed, having
    decompressed at most one chunk (1 MiB) more than the cap, not the whole stream."""
    bomb = gzip_zeros_bomb(big_file_header("zeros", 2 << 30), 2048)
    budget = ImportBudget(ImportLimits(max_layer_bytes=8 << 20))
    budget.start_layer("sha256:bomb")
    root = tmp_path / "layer"
    root.mkdir()
    reader = HashingReader(gzip.GzipFile(fileobj=io.BytesIO(bomb)), on_read=budget.add_read)
    with pytest.raises(ImportLimitExceeded) as info:
        with LayerExtractor(str(root), "sha256:bomb", marks=RecordingMarks(), budget=budget) as x:
            x.extract(reader)  # type: ignore[arg-type]
    assert budget.layer_read_bytes <= (8 << 20) + (1 << 20)
    message = str(info.value)
    assert "layer sha256:bomb" in message and "8M" in message and "--max-layer-size" in message


def test_a_refused_bomb_leaves_nothing_behind(store, tmp_path):
    bomb = gzip_zeros_bomb(big_file_header("zeros", 64 << 20), 64)
    with pytest.raises(ImportLimitExceeded, match=r"layer sha256:[0-9a-f]{64}: .*layer size cap of 16M"):
        import_blob(store, tmp_path, bomb, ImportLimits(max_layer_bytes=16 << 20))
    assert_store_clean(store)
    with pytest.raises(ImportLimitExceeded, match=r"image size cap of 4M; raise --max-image-size"):
        import_blob(store, tmp_path, bomb, ImportLimits(max_image_bytes=4 << 20))
    assert_store_clean(store)


def test_the_image_cap_sums_the_layers_and_the_file_cap_counts_made_directories(store, tmp_path):
    layers = [layer_tar(Entry(f"f{i}", data=b"x" * 600)) for i in range(2)]
    layout = Layout(tmp_path / "two")
    layout.add_image(layers)
    # each layer's tar is 10 KiB (tarfile pads to 20 blocks): the second crosses 15,000 bytes
    with pytest.raises(ImportLimitExceeded, match=rf"layer {layout.images[0]['layers'][1]['digest']}"
                       r": uncompressed tar of the image so far exceeds the image size cap of 14.65K"):
        store.import_(str(layout.root), "two", limits=ImportLimits(max_image_bytes=15_000))
    assert_store_clean(store)

    deep = Layout(tmp_path / "deep")
    deep.add_image([layer_tar(Entry("a/b/c/d/e/f/g/h/file", data=b"x"))])
    with pytest.raises(ImportLimitExceeded, match=r"more than 5 files .* raise --max-files"):
        store.import_(str(deep.root), "deep", limits=ImportLimits(max_files=5))
    assert_store_clean(store)
    assert store.import_(str(deep.root), "deep", limits=ImportLimits(max_files=11)).name == "deep"


def test_a_big_file_is_refused_from_its_header_before_it_is_written(store, tmp_path, monkeypatch):
    written: list[int] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: written.append(len(data)) or real_write(fd, data))
    bomb = gzip_zeros_bomb(big_file_header("zeros", 64 << 20), 64)
    with pytest.raises(ImportLimitExceeded, match="layer size cap of 1M"):
        import_blob(store, tmp_path, bomb, ImportLimits(max_layer_bytes=1 << 20))
    assert sum(written) < 1 << 20  # not one chunk of the file: refused from its header
    assert_store_clean(store)


def test_limits_must_be_positive():
    with pytest.raises(SpecError, match="max_files must be positive"):
        ImportLimits(max_files=0)


# -- hostile headers --------------------------------------------------------------------------


def with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def gnu_sparse_tar(name: str, realsize: int) -> bytes:
    """An old-GNU sparse member ('S'): a 1-byte data block that claims ``realsize`` bytes."""
    info = tarfile.TarInfo(name)
    info.size = 512
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % (realsize - 1)  # one data byte at the very end
    header[398:410] = b"%011o\0" % 1
    header[483:495] = b"%011o\0" % realsize
    return with_checksum(header) + b"x" + b"\0" * 511 + b"\0" * 1024


def pax_tar(records: dict[str, str], name: str = "f", data: bytes = b"x") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.pax_headers = records
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def raw_pax_tar(payload: bytes) -> bytes:
    """A pax header whose records are ``payload`` as is, then a file."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(payload)
    padded = payload + b"\0" * (-len(payload) % 512)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + padded + layer_tar(Entry("f", data=b"x"))


@pytest.mark.parametrize(
    "layer,message",
    [
        (gnu_sparse_tar("sparse", 1 << 40), r"'sparse' is a GNU sparse file; sparse files are not"),
        (pax_tar({"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s"}),
         r"pax header GNU.sparse.major: sparse files are not supported"),
        (pax_tar({"GNU.sparse.map": "0,1,x"}), r"GNU.sparse.map: sparse files"),
        (pax_tar({"GNU.sparse.realsize": "1099511627776"}), r"sparse files are not supported"),
        (raw_pax_tar(b"1" * 65536), r"malformed pax record at byte 0"),  # CVE-2024-6232's shape
        (raw_pax_tar(b"9 path=a\n" + b"11 size=-3\n"), r"'a' has a negative size -3"),
        (raw_pax_tar(b"12 size=xyz\n"), r"pax header size='xyz' is not a number"),
        (raw_pax_tar(b"30 path=a\n"), r"malformed pax record at byte 0 \(length 30\)"),
        (pax_tar({"mtime": "nan"}), r"member 'f': mtime nan is out of range"),
        (raw_pax_tar(b"210 size=" + b"1" * 200 + b"\n"), r"uncompressed tar exceeds the layer size"),
        (pax_tar({"mtime": "1e30"}), r"mtime 1e\+30 is out of range"),
        (pax_tar({"uid": "-1"}), r"uid -1 is out of range"),
        (pax_tar({"gid": "4294967295"}), r"gid 4294967295 is out of range"),
        (pax_tar({"path": "a/" * 300 + "f"}), r"path is deeper than 256 levels"),
        (pax_tar({"path": "d/" + "x" * 4100}), r"path is longer than 4095 bytes"),
        (pax_tar({"path": "x" * 256}), r"File name too long"),
        (pax_tar({"linkpath": "a\0b"}, name="l"), None),  # a file's linkpath is not used
    ],
)
def test_hostile_headers_are_refused_by_name(store, tmp_path, layer, message):
    if message is None:
        assert import_layer_image(store, tmp_path, layer).name == "bad"
        return
    with pytest.raises(SpecError, match=message):
        import_layer(store, tmp_path, layer)
    assert_store_clean(store)


def import_layer_image(store: ImageStore, tmp_path: Path, layer: bytes):
    layout = Layout(tmp_path / "bad")
    layout.add_image([layer])
    return store.import_(str(layout.root), "bad")


def test_an_oversized_long_name_header_is_refused_before_it_is_read(store, tmp_path):
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 1 << 30  # tarfile would allocate all of it
    layer = info.tobuf(format=tarfile.GNU_FORMAT) + b"a" * 512
    with pytest.raises(SpecError, match=r"extended header of 1073741824 bytes .* over the 1048576-byte"):
        import_layer(store, tmp_path, layer)
    assert_store_clean(store)


def test_hostile_but_harmless_members_stay_inside_the_layer(store, tmp_path, outside, marks):
    layer = layer_tar(
        Entry("new\nline", data=b"n"),
        Entry("dup", data=b"first"),
        Entry("dup", "d"),
        Entry("dup/inner", data=b"i"),
        Entry("dup", data=b"last wins"),
        Entry("twice", "d", mode=0o700),
        Entry("twice", "d", mode=0o750),
        Entry("su", data=b"#!", mode=0o6755),
        Entry("escape", "l", link=str(outside)),
        Entry("escape", data=b"replaces the symlink, not its target"),
        Entry("hl-src", data=b"h"),
        Entry("x/.wh.\n", data=b""),
        Entry("./.wh..wh..opq"),
        Entry("x/.wh..wh.plnk/ignored", data=b""),
    )
    image = import_layer_image(store, tmp_path, layer)
    root = Path(image.layers[0])
    assert (root / "new\nline").read_bytes() == b"n"
    assert (root / "dup").read_bytes() == b"last wins"
    assert stat.S_IMODE((root / "twice").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "su").stat().st_mode) == 0o6755  # images need setuid (su, ping)
    assert not (root / "escape").is_symlink() and (root / "escape").read_bytes().startswith(b"repl")
    assert os.listdir(outside) == []
    assert "x/\n" in marks.whiteouts and "" in marks.opaque_dirs
    assert stat.S_IMODE(os.stat(store.paths.layers).st_mode) == 0o700  # setuid files unreachable


@pytest.mark.parametrize(
    "entries,message",
    [
        ([Entry(".wh.", data=b"")], r"bad whiteout name"),
        ([Entry("d/.wh...", data=b"")], r"bad whiteout name"),
        ([Entry("s", "l", link="")], r"bad symlink target ''"),
        ([Entry("h", "h", link="later"), Entry("later", data=b"x")], r"'later' is not in this layer"),
        ([Entry("d", "d"), Entry("h", "h", link="d")], r"hard link to directory 'd'"),
        ([Entry("h", "h", link=".")], r"hard link to the layer root"),
    ],
)
def test_more_unsafe_members_are_refused(store, tmp_path, entries, message):
    with pytest.raises(SpecError, match=message):
        import_layer(store, tmp_path, layer_tar(*entries))
    assert_store_clean(store)


def test_a_symlink_target_with_nul_is_refused(store, tmp_path):
    info = tarfile.TarInfo("s")
    info.type = tarfile.SYMTYPE
    info.pax_headers = {"linkpath": "a\0b"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info)
    with pytest.raises(SpecError, match=r"member 's': bad symlink target 'a\\x00b'"):
        import_layer(store, tmp_path, buf.getvalue())
    assert_store_clean(store)


# -- hostile sources --------------------------------------------------------------------------


def test_layout_blobs_must_be_regular_files_inside_the_layout(store, layout):
    layer_hex = layout.images[0]["layers"][0]["digest"][7:]
    blob = layout.root / "blobs/sha256" / layer_hex
    blob.unlink()
    blob.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(SpecError, match=f"blobs/sha256/{layer_hex} is a symlink out of the image"):
        store.import_(str(layout.root))
    blob.unlink()
    os.mkfifo(blob)  # opening it would block forever
    with pytest.raises(SpecError, match=f"blobs/sha256/{layer_hex} is not a regular file"):
        store.import_(str(layout.root))
    assert_store_clean(store)


def test_an_archive_is_indexed_only_up_to_the_caps(store, layout, tmp_path):
    archive = layout.archive(tmp_path / "webapp.tar")
    with pytest.raises(ImportLimitExceeded, match=r"lists more than 3 members; raise --max-files"):
        store.import_(str(archive), limits=ImportLimits(max_files=3))
    zeros = tmp_path / "zeros.tar.gz"  # a compressed archive that expands to 64 MiB
    zeros.write_bytes(gzip_zeros_bomb(big_file_header("blobs/sha256/" + "0" * 64, 64 << 20), 64))
    with pytest.raises(ImportLimitExceeded, match=r"archive is larger than 1025K uncompressed"):
        store.import_(str(zeros), limits=ImportLimits(max_image_bytes=1 << 20, max_files=1))
    assert_store_clean(store)


def test_an_archive_link_loop_is_refused(store, tmp_path):
    archive = tmp_path / "loop.tar"
    with tarfile.open(archive, "w") as tar:
        for name, target in (("index.json", "a"), ("a", "b"), ("b", "a")):
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    with pytest.raises(SpecError, match="index.json: more than 8 links to follow"):
        store.import_(str(archive), "loop")
    assert_store_clean(store)


# -- the host failing -------------------------------------------------------------------------


class FullDiskMarks(RecordingMarks):
    def whiteout(self, dir_fd: int, name: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_path_and_leaves_nothing(paths, recipes, layout, tmp_path):
    store = ImageStore(paths, recipes_dir=str(recipes), marks=FullDiskMarks())
    with pytest.raises(KernelError) as info:
        store.import_(str(layout.root))
    assert info.value.errno == errno.ENOSPC
    assert f"{paths.data_root}/{TMP_DIR}/layer-" in str(info.value)
    assert "etc/.wh.gone" in str(info.value) and "No space left on device" in str(info.value)
    assert_store_clean(store)


def test_a_failed_record_write_takes_back_the_new_layers(store, layout, monkeypatch):
    def full(image):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_write_record", full)
    with pytest.raises(KernelError, match=rf"import image into {store.paths.data_root}: \[Errno 28\]"):
        store.import_(str(layout.root))
    assert_store_clean(store)
    monkeypatch.undo()
    assert store.import_(str(layout.root)).name == "webapp:1.0"  # the store still works


def test_cli_import_caps(paths, tmp_path):
    obj = SimpleNamespace(paths=paths)
    layout = Layout(tmp_path / "layout")
    layout.add_image([layer_tar(Entry("big", data=b"x" * 4096))])
    result = CliRunner().invoke(image_cli, ["import", str(layout.root), "--max-layer-size", "1K"], obj=obj)
    assert result.exit_code == SpecError.exit_code, result.output
    assert "layer size cap of 1K; raise --max-layer-size" in result.output
    result = CliRunner().invoke(image_cli, ["import", str(layout.root), "--max-files", "1"], obj=obj)
    assert result.exit_code == SpecError.exit_code and "--max-files" in result.output
    result = CliRunner().invoke(image_cli, ["import", str(layout.root), "--max-layer-size", "lots"], obj=obj)
    assert result.exit_code == SpecError.exit_code and "--max-layer-size" in result.output
    result = CliRunner().invoke(image_cli, ["import", str(layout.root), "--max-image-size", "20K"], obj=obj)
    assert result.exit_code == 0, result.output
