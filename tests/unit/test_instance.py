"""instance.py: the one recipe every app and pooled instance is made from."""

from __future__ import annotations

import pytest

from fcrun.errors import SpecError
from fcrun.images.image import ImageConfig
from fcrun.instance import DEFAULT_PIDS_MAX, docroot_target, instance_spec, make_instance
from fcrun.runtime.options import ROOTFS_ANNOTATION


class Image:
    name = "apache-php"
    layers: list[str] = []

    def __init__(self, docroot=None):
        self.config = ImageConfig(cmd=["apache2-foreground"], exposed_ports=[80], docroot=docroot)


def spec():
    return instance_spec(Image(), name="site-1", cpu=0.3, memory_bytes=64 << 20)


def test_an_instance_has_a_user_namespace_without_fixed_mappings():
    s = spec()
    assert "user" in [ns.type for ns in s.linux.namespaces]
    assert s.linux.uid_mappings == [] and s.linux.gid_mappings == []  # the runtime leases a range


def test_an_instance_cannot_forge_packets_or_make_devices():
    caps = spec().process.capabilities
    for field in ("bounding", "effective", "permitted"):
        names = getattr(caps, field)
        assert "CAP_NET_RAW" not in names and "CAP_MKNOD" not in names, field
        assert "CAP_NET_BIND_SERVICE" in names and "CAP_SETUID" in names, field  # Apache still works


def test_an_instance_has_a_pids_limit_by_default_and_the_apps_own_when_given():
    assert spec().linux.resources.pids.limit == DEFAULT_PIDS_MAX
    s = instance_spec(Image(), name="x", cpu=None, memory_bytes=None, pids_max=64)
    assert s.linux.resources.pids.limit == 64


def test_an_instance_writes_to_memory_not_to_the_data_root():
    assert spec().annotations[ROOTFS_ANNOTATION] == "tmpfs"


def test_the_docroot_target_is_the_images_or_the_default():
    assert docroot_target(Image()) == "/var/www/html"
    assert docroot_target(Image("/srv/www")) == "/srv/www"


class RecordingRuntime:
    """Runtime.run as make_instance calls it; refuses a slot_source under /etc, as the real
    one does (before it makes anything: tests/root/test_slot_root.py)."""

    def __init__(self):
        self.calls = []

    def run(self, name, spec, *, image, detach, labels, slot, slot_source):
        if slot_source and slot_source.startswith("/etc"):
            raise SpecError(f"{slot_source} is outside the allowed docroot roots", "slot_source")
        self.calls.append(("run", name, slot, slot_source, detach))
        return f"container {name}"


def test_the_docroot_is_mounted_in_the_slot_as_the_instance_is_made_in_one_step():
    rt = RecordingRuntime()
    made = make_instance(rt, Image(), name="a-1", cpu=0.5, memory_bytes=None, labels={}, docroot="/srv/a")
    assert made == "container a-1"
    assert rt.calls == [("run", "a-1", "/var/www/html", "/srv/a", True)]


def test_without_a_docroot_the_image_serves_its_own_and_a_pooled_instance_gets_an_empty_slot():
    rt = RecordingRuntime()
    make_instance(rt, Image(), name="a-1", cpu=0.5, memory_bytes=None, labels={})
    make_instance(rt, Image(), name="p-1", cpu=0.5, memory_bytes=None, labels={}, pooled=True)
    assert rt.calls == [("run", "a-1", None, None, True), ("run", "p-1", "/var/www/html", None, True)]


def test_a_refused_docroot_is_the_runtimes_error_and_nothing_else_is_called():
    rt = RecordingRuntime()
    with pytest.raises(SpecError, match="outside the allowed docroot roots"):
        make_instance(rt, Image(), name="a-1", cpu=0.5, memory_bytes=None, labels={}, docroot="/etc")
    assert rt.calls == []
