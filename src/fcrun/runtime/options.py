"""From `fcrun run`-style options and an image's run config to an OCI spec.

The image supplies defaults (entrypoint, cmd, env, working dir, user); options override them,
as `docker run` does. Every check names the option it is about.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ..errors import SpecError
from ..units import CPU_PERIOD_US, cpu_to_quota_us, is_decimal
from .spec import DEFAULT_ENV, Namespace, NetworkMode, Seccomp, Spec, default_spec

ROOTFS_ANNOTATION = "org.fcrun.rootfs"  # "tmpfs": a memory-backed writable layer
IMAGE_FILE_MAX_BYTES = 1 << 20  # /etc/passwd, /etc/group read from an image: more is an attack
MAX_USER_ID = 2**32 - 2  # uid_t is 32 bits; (uid_t)-1 means "leave unchanged" to setresuid


class RunOptions(msgspec.Struct, kw_only=True):
    """What a user can say about a container besides its image."""

    args: list[str] = []  # empty: the image's entrypoint + cmd
    entrypoint: list[str] | None = None
    cpu: float | None = None  # fraction of one CPU
    memory_bytes: int | None = None
    pids_max: int | None = None
    hostname: str = ""
    env: list[str] = []
    network: NetworkMode = "bridge"
    workdir: str = ""
    user: str = ""
    readonly_rootfs: bool = False
    # The writable layer on a tmpfs in the container's own mount namespace (Runtime.create's
    # volatile_rootfs): nothing written to disk; the container's files vanish when it stops.
    volatile_rootfs: bool = False
    # "default": seccomp.DEFAULT_PROFILE; "unconfined": no filter; or a profile of its own
    # (seccomp.parse_security_opts reads --security-opt seccomp=PROFILE.json into one).
    seccomp: Seccomp | Literal["default", "unconfined"] = "default"
    # A user namespace with a host id range of its own (userns.py); off by default, as in runc.
    userns: bool = False


def parse_env(items: list[str] | tuple[str, ...], where: str = "--env") -> list[str]:
    out = []
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key or any(c.isspace() for c in key):
            raise SpecError(f"environment entry {item!r} is not KEY=VALUE", where)
        out.append(item)
    return out


def merge_env(base: list[str], extra: list[str]) -> list[str]:
    """Later entries win, order of first appearance kept."""
    merged: dict[str, str] = {}
    for item in base + extra:
        key, _, value = item.partition("=")
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def _image_file_lines(layers: list[str], relpath: str, where: str) -> list[str]:
    """Lines of a file in the image (layers listed bottom first) as the container sees it;
    none where it is missing or not a regular file. Never reads outside the layers.

    Raises:
        SpecError: the file is over IMAGE_FILE_MAX_BYTES, or could not be read.
    """
    from ..images.merged import read_file  # the images package is heavy; only a user name needs it

    try:
        data = read_file(layers, relpath, IMAGE_FILE_MAX_BYTES)
    except OSError as exc:
        raise SpecError(f"read the image's /{relpath}: {exc}", where) from None
    return data.decode("utf-8", errors="replace").splitlines() if data is not None else []


def resolve_user(user: str, layers: list[str], where: str = "--user") -> tuple[int, int]:
    """'1000', '1000:1000', 'www-data', 'www-data:www-data' -> (uid, gid) using the image's files.

    Raises:
        SpecError: an unknown name, an id out of range, or the image's entry for the name
            holds no number there (a hostile image's /etc/passwd is read as any other input).
    """
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    uid = gid = None
    if is_decimal(name):
        uid = _user_id(name, "uid", where)
    else:
        for line in _image_file_lines(layers, "etc/passwd", where):
            fields = line.strip().split(":")
            if len(fields) >= 4 and fields[0] == name:
                uid, gid = _user_id(fields[2], f"uid of {name!r} in the image's /etc/passwd", where), \
                    _user_id(fields[3], f"gid of {name!r} in the image's /etc/passwd", where)
                break
        if uid is None:
            raise SpecError(f"user {name!r} not found in the image's /etc/passwd", where)
    if group:
        if is_decimal(group):
            gid = _user_id(group, "gid", where)
        else:
            gid = None
            for line in _image_file_lines(layers, "etc/group", where):
                fields = line.strip().split(":")
                if len(fields) >= 3 and fields[0] == group:
                    gid = _user_id(fields[2], f"gid of {group!r} in the image's /etc/group", where)
                    break
            if gid is None:
                raise SpecError(f"group {group!r} not found in the image's /etc/group", where)
    return uid, gid if gid is not None else uid


def _user_id(text: str, what: str, where: str) -> int:
    """A uid or gid: the kernel's are 32-bit, and (uid_t)-1 means "no change"."""
    if not is_decimal(text, 10) or int(text) > MAX_USER_ID:
        raise SpecError(f"{what} {text[:20]!r} is not a number in 0..{MAX_USER_ID}", where)
    return int(text)


def spec_from_image(image, options: RunOptions, *, name: str = "") -> Spec:
    """Build the container's spec from an images.Image (or None for a bare rootfs) and options."""
    config = image.config if image is not None else None
    layers = image.layers if image is not None else []
    entrypoint = options.entrypoint if options.entrypoint is not None else (config.entrypoint if config else [])
    args = list(entrypoint) + (list(options.args) if options.args else (list(config.cmd) if config and options.entrypoint is None else []))
    if not args:
        raise SpecError("no command given and the image has no entrypoint or cmd", "COMMAND")
    workdir = options.workdir or (config.workdir if config else "") or "/"
    if not workdir.startswith("/"):
        raise SpecError(f"working directory {workdir!r} must be absolute", "--workdir")
    uid, gid = resolve_user(options.user or (config.user if config else ""), layers)
    env = merge_env(DEFAULT_ENV, (list(config.env) if config else []) + parse_env(options.env))
    spec = default_spec(
        args,
        env=env,
        cwd=workdir,
        uid=uid,
        gid=gid,
        hostname=options.hostname or name,
        network=options.network,
        cpu_quota_us=cpu_to_quota_us(options.cpu) if options.cpu else None,
        cpu_period_us=CPU_PERIOD_US,
        memory_bytes=options.memory_bytes,
        pids_max=options.pids_max,
        readonly_rootfs=options.readonly_rootfs,
    )
    if options.volatile_rootfs:
        if image is None:
            raise SpecError("a memory-backed rootfs needs an image", "--tmpfs-rootfs")
        spec.annotations[ROOTFS_ANNOTATION] = "tmpfs"
    if options.userns:
        spec.linux.namespaces.append(Namespace(type="user"))
    if options.seccomp == "unconfined":
        spec.linux.seccomp = None
    elif options.seccomp != "default":
        spec.linux.seccomp = options.seccomp
    return spec
