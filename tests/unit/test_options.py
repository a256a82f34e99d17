import os
import stat

import pytest

from fcrun.errors import SpecError
from fcrun.images.layer import OVERLAY_OPAQUE_XATTR
from fcrun.runtime.options import RunOptions, merge_env, parse_env, resolve_user, spec_from_image


class FakeConfig:
    entrypoint: list = []
    cmd = ["sh"]
    env = ["LANG=C", "PATH=/opt/bin:/bin"]
    workdir = "/srv"
    user = ""


class FakeImage:
    name = "busybox"

    def __init__(self, layers):
        self.layers = layers
        self.config = FakeConfig()


@pytest.fixture
def layers(tmp_path):
    base = tmp_path / "base" / "etc"
    base.mkdir(parents=True)
    (base / "passwd").write_text("root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/false\n")
    (base / "group").write_text("root:x:0:\nwww-data:x:33:\nstaff:x:50:\n")
    return [str(tmp_path / "base")]


def test_image_defaults_and_overrides(layers):
    image = FakeImage(layers)
    spec = spec_from_image(image, RunOptions(), name="c1")
    assert spec.process.args == ["sh"]
    assert spec.process.cwd == "/srv"
    assert "PATH=/opt/bin:/bin" in spec.process.env and "LANG=C" in spec.process.env
    assert spec.hostname == "c1"
    spec = spec_from_image(image, RunOptions(args=["echo", "hi"], env=["LANG=de"], workdir="/tmp", cpu=0.3,
                                             memory_bytes=64 << 20, pids_max=20), name="c1")
    assert spec.process.args == ["echo", "hi"]
    assert "LANG=de" in spec.process.env and "LANG=C" not in spec.process.env
    assert spec.linux.resources.cpu.quota == 30000
    assert spec.linux.resources.memory.limit == 64 << 20
    assert spec.linux.resources.pids.limit == 20


def test_users_from_the_image(layers):
    assert resolve_user("www-data", layers) == (33, 33)
    assert resolve_user("www-data:staff", layers) == (33, 50)
    assert resolve_user("1000", layers) == (1000, 1000)
    assert resolve_user("1000:5", layers) == (1000, 5)
    with pytest.raises(SpecError, match="user 'nobody' not found.*--user"):
        resolve_user("nobody", layers)
    with pytest.raises(SpecError, match="group 'wheel'"):
        resolve_user("www-data:wheel", layers)


@pytest.mark.parametrize("user, words", [
    ("\u00b2", "not found"),  # "²" is no uid: a name, and no such user (int() raised ValueError)
    ("99999999999", "not a number in 0..4294967294"),
    ("www-data:" + "9" * 5000, "not found in the image's /etc/group"),  # too long for an id: a name
    ("evil", "uid of 'evil' in the image's /etc/passwd"),
    ("www-data:evil", "gid of 'evil' in the image's /etc/group"),
])
def test_a_user_that_is_no_id_or_an_images_entry_that_holds_none_is_refused(layers, user, words):
    """Every image is hostile: its /etc/passwd and /etc/group are input like a flag."""
    with open(layers[0] + "/etc/passwd", "a") as f:
        f.write("evil:x:\u00b2:33::/:/bin/sh\n")
    with open(layers[0] + "/etc/group", "a") as f:
        f.write("evil:x:-1:\n")
    with pytest.raises(SpecError, match=words) as info:
        resolve_user(user, layers)
    assert info.value.where == "--user"


def test_env_parsing():
    assert parse_env(["A=1", "B="]) == ["A=1", "B="]
    with pytest.raises(SpecError, match="'NOPE' is not KEY=VALUE.*--env"):
        parse_env(["NOPE"])
    assert merge_env(["A=1", "B=2"], ["A=3"]) == ["A=3", "B=2"]


def test_no_command_anywhere(layers):
    image = FakeImage(layers)
    image.config.cmd = []
    with pytest.raises(SpecError, match="no command"):
        spec_from_image(image, RunOptions(), name="x")
    image.config.cmd = ["sh"]


def test_volatile_rootfs_is_an_annotation_of_the_spec(layers):
    image = FakeImage(layers)
    assert "org.fcrun.rootfs" not in spec_from_image(image, RunOptions(), name="c1").annotations
    spec = spec_from_image(image, RunOptions(volatile_rootfs=True), name="c1")
    assert spec.annotations["org.fcrun.rootfs"] == "tmpfs"
    with pytest.raises(SpecError, match="needs an image"):
        spec_from_image(None, RunOptions(args=["sh"], volatile_rootfs=True))


def test_user_lookup_never_leaves_the_image(tmp_path):
    # A hostile image whose etc is a symlink to a host directory: the lookup follows it inside
    # the image (where there is no such directory), never to the host's file.
    host = tmp_path / "host"
    host.mkdir()
    (host / "passwd").write_text("evil:x:4242:4242::/:/bin/sh\n")
    (host / "group").write_text("evil:x:4242:\n")
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "etc").symlink_to(host)
    with pytest.raises(SpecError, match="user 'evil' not found"):
        resolve_user("evil", [str(layer)])
    with pytest.raises(SpecError, match="group 'evil' not found"):
        resolve_user("0:evil", [str(layer)])
    # ... and ../../ in a relative target stops at the image's root.
    (layer / "etc").unlink()
    (layer / "etc").symlink_to("../../../../../../../../../" + str(host).lstrip("/"))
    with pytest.raises(SpecError, match="user 'evil' not found"):
        resolve_user("evil", [str(layer)])


def test_user_lookup_follows_the_images_own_symlinks_in_its_merged_view(tmp_path):
    lower = tmp_path / "lower"
    (lower / "usr" / "etc").mkdir(parents=True)
    (lower / "usr" / "etc" / "passwd").write_text("app:x:7:8::/:/bin/sh\n")
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "etc").symlink_to("/usr/etc")  # absolute: from the image's root, in any layer
    assert resolve_user("app", [str(lower), str(upper)]) == (7, 8)


def test_user_lookup_refuses_fifos_and_huge_files(tmp_path):
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    os.mkfifo(layer / "etc" / "passwd")  # opening it would block for ever
    with pytest.raises(SpecError, match="user 'app' not found"):
        resolve_user("app", [str(layer)])
    (layer / "etc" / "passwd").unlink()
    (layer / "etc" / "passwd").write_text("app:x:7:8::/:/bin/sh\n" + "#" * (1 << 20))
    with pytest.raises(SpecError, match=r"read the image's /etc/passwd: \[Errno 27\].*--user"):
        resolve_user("app", [str(layer)])


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts (mknod) and trusted.* xattrs need root")
def test_user_lookup_respects_whiteouts_and_opaque_dirs(tmp_path):
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "passwd").write_text("app:x:7:8::/:/bin/sh\n")
    (lower / "etc" / "group").write_text("grp:x:9:\n")
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc" / "passwd", stat.S_IFCHR, os.makedev(0, 0))  # layer.py's whiteout
    layers = [str(lower), str(upper)]
    with pytest.raises(SpecError, match="user 'app' not found"):
        resolve_user("app", layers)
    assert resolve_user("0:grp", layers) == (0, 9)  # the rest of the lower etc still shows
    os.setxattr(upper / "etc", OVERLAY_OPAQUE_XATTR, b"y")
    with pytest.raises(SpecError, match="group 'grp' not found"):
        resolve_user("0:grp", layers)
    os.unlink(upper / "etc" / "passwd")
    with pytest.raises(SpecError, match="user 'app' not found"):
        resolve_user("app", layers)  # hidden by the opaque dir now, not by the whiteout
