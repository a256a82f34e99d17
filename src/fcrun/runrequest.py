"""`fcrun run`: its options as one typed request, and the one way they become a container.

Two programs run `fcrun run`: the click CLI in the user's process (fcrun_cli/main.py), and the
fork-server for the thin client (forkserver/server.py, whose wire message protocol.Run is this
request plus the client's settings). Both build a RunRequest and call `run_spec`, so every
option is parsed, checked and applied in one place and one order, and a bad option reads the
same whichever ran it (``invalid --pids 0: must be >= 1 (at --pids)``).

Values are what the user typed where a unit is involved (``cpu="0.3"``, ``memory="512M"``):
parsing them is part of the rule, and its errors name the flag.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, get_args

import msgspec

from .errors import SpecError
from .runtime.options import RunOptions, spec_from_image
from .runtime.spec import NetworkMode, Spec
from .units import parse_cpu, parse_memory

if TYPE_CHECKING:  # the images package is heavy; the fast paths need only the name
    from .images.image import Image

NETWORKS: tuple[str, ...] = get_args(NetworkMode)  # --net: bridge, none, host


class RunRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The options of `fcrun run` (all but --keep, which only the foreground CLI acts on)."""

    image: str
    args: list[str] = []  # COMMAND; empty: the image's entrypoint and cmd
    name: str | None = None  # None: a random fc-<hex> name
    detach: bool = False
    cpu: str | None = None  # a fraction of one CPU, as typed (units.parse_cpu)
    memory: str | None = None  # 512M, 1G (units.parse_memory)
    pids: int | None = None
    hostname: str = ""  # "": the container's name
    env: list[str] = []  # KEY=VALUE
    network: str = "bridge"  # one of NETWORKS
    workdir: str = ""
    user: str = ""  # uid[:gid] or name[:group] from the image
    read_only: bool = False
    tmpfs_rootfs: bool = False  # the writable layer in memory
    entrypoint: str | None = None  # a single program; "" or None: the image's
    init: bool = True  # False: --no-init, COMMAND is pid 1 itself
    security_opts: list[str] = []  # seccomp=unconfined|default|PROFILE.json (a file: read here)
    userns: bool = False


class RunPlan(msgspec.Struct, frozen=True):
    """What `fcrun run` creates: Runtime.create/run(name, spec, image=image, detach=..., init=...)."""

    name: str
    image: Image
    spec: Spec
    detach: bool
    init: bool


def new_container_name() -> str:
    """A name for a container the user did not name (as `docker run` makes one up)."""
    return "fc-" + uuid.uuid4().hex[:10]


def run_spec(request: RunRequest, get_image: Callable[[str], Image]) -> RunPlan:
    """The container `fcrun run` makes for `request`: every option checked and applied.

    `get_image(name)` returns the Image to run; it is called once every option is known
    to be good (the CLI checks for root there, so a bad option is reported to anyone).

    Raises:
        SpecError: a bad option, naming its flag (``--cpu``, ``--memory``, ``--pids``,
            ``--security-opt``, ``--env``, ``--workdir``, ``--user``, ``COMMAND``).
        NotFound: no such image (from `get_image`).
    """
    if request.network not in NETWORKS:
        raise SpecError(f"network {request.network!r} is not one of {', '.join(NETWORKS)}", "--net")
    cpu = parse_cpu(request.cpu) if request.cpu is not None else None
    memory_bytes = parse_memory(request.memory) if request.memory is not None else None
    seccomp = "default"
    if request.security_opts:
        from .seccomp import parse_security_opts  # reads a profile file: only when one is named

        seccomp = parse_security_opts(request.security_opts)
    options = RunOptions(
        args=list(request.args),
        entrypoint=[request.entrypoint] if request.entrypoint else None,
        cpu=cpu,
        memory_bytes=memory_bytes,
        pids_max=request.pids,
        hostname=request.hostname,
        env=list(request.env),
        network=request.network,
        workdir=request.workdir,
        user=request.user,
        readonly_rootfs=request.read_only,
        volatile_rootfs=request.tmpfs_rootfs,
        seccomp=seccomp,
        userns=request.userns,
    )
    if request.pids is not None and request.pids < 1:
        raise SpecError(f"invalid --pids {request.pids}: must be >= 1", "--pids")
    name = request.name or new_container_name()
    image = get_image(request.image)
    spec = spec_from_image(image, options, name=name)
    return RunPlan(name=name, image=image, spec=spec, detach=request.detach, init=request.init)


__all__ = ["NETWORKS", "RunPlan", "RunRequest", "new_container_name", "run_spec"]
