"""An image's config blob: its shape, and what fcrun takes from it.

The config says how to run the image (turned into fcrun's ``ImageConfig``) and, in
``rootfs.diff_ids``, the digest each layer has once uncompressed, which the store checks every
extracted layer against. A layer's media type says how its blob is compressed.
"""

from __future__ import annotations

import msgspec

from ..errors import SpecError
from ..units import is_decimal
from .image import ImageConfig
from .oci_source import blob_path

CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)

# media type -> compression ("" = plain tar)
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


class ContainerConfig(msgspec.Struct, kw_only=True, rename="pascal"):
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] | None = None
    working_dir: str = ""
    user: str = ""
    exposed_ports: dict[str, object] | None = None
    stop_signal: str = ""


class RootFS(msgspec.Struct, kw_only=True):
    type: str = "layers"
    diff_ids: list[str] = []


class ConfigFile(msgspec.Struct, kw_only=True):
    architecture: str = ""
    os: str = ""
    config: ContainerConfig | None = None
    rootfs: RootFS | None = None


def layer_compression(media_type: str, digest: str) -> str:
    """How a layer blob of ``media_type`` is compressed: "gzip", or "" for a plain tar.

    Raises:
        SpecError: zstd (not supported) or an unknown layer media type.
    """
    if media_type in LAYER_TYPES:
        return LAYER_TYPES[media_type]
    if "zstd" in media_type:
        raise SpecError(f"layer {digest}: zstd-compressed layers ({media_type}) are not supported")
    raise SpecError(f"layer {digest}: unknown layer media type {media_type!r}")


def checked_diff_ids(config_file: ConfigFile, layer_count: int, cfg_path: str) -> list[str | None]:
    """The config's diff_id of each of ``layer_count`` layers (all None when it lists none).

    Raises:
        SpecError: the image is not for linux, the count does not match the layers, or a
            diff_id is not a sha256 digest.
    """
    if config_file.os and config_file.os != "linux":
        raise SpecError(f"{cfg_path}: image is for os {config_file.os!r}, not linux")
    diff_ids = config_file.rootfs.diff_ids if config_file.rootfs else []
    if not diff_ids:
        return [None] * layer_count
    if len(diff_ids) != layer_count:
        raise SpecError(
            f"{cfg_path}: config lists {len(diff_ids)} diff_ids for {layer_count} layers"
        )
    for i, diff_id in enumerate(diff_ids):
        blob_path(diff_id, f"{cfg_path} $.rootfs.diff_ids[{i}]")
    return list(diff_ids)


def image_config(config_file: ConfigFile, cfg_path: str) -> ImageConfig:
    """The run config fcrun keeps (entrypoint, cmd, env, workdir, user, TCP ports, stop signal).

    Raises:
        SpecError: a malformed exposed port or a value ImageConfig refuses.
    """
    cc = config_file.config or ContainerConfig()
    ports: set[int] = set()
    for spec in cc.exposed_ports or {}:
        number, _, proto = spec.partition("/")
        if proto not in ("", "tcp"):
            continue  # fcrun forwards HTTP: only TCP ports matter
        if not is_decimal(number, 5):
            raise SpecError(f"{cfg_path}: bad exposed port {spec!r}", "$.config.ExposedPorts")
        ports.add(int(number))
    try:
        return ImageConfig(
            entrypoint=list(cc.entrypoint or []),
            cmd=list(cc.cmd or []),
            env=list(cc.env or []),
            workdir=cc.working_dir or "/",
            user=cc.user,
            exposed_ports=sorted(ports),
            stop_signal=cc.stop_signal or "SIGTERM",
        )
    except ValueError as exc:
        raise SpecError(f"{cfg_path}: {exc}", "$.config") from None
