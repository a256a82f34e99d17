import pytest

from fcrun.errors import SpecError
from fcrun.options import RunOptions, merge_env, parse_env, resolve_user, spec_from_image


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
