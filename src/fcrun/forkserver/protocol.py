"""What serve and the fork-server say to each other, and the checks on every request.

Wire: a root-only unix stream socket; each message is a 4-byte big-endian length, then that
many bytes of msgpack (one msgspec tagged Struct). One request, one reply, in order::

    serve (client)                          fork-server
    Claim(image, name, app, limits, docroot) -->   a pooled instance: limits, docroot, labels,
                                             <--   Made(path="pool") | Empty(reason)
    Start(image, name, app, limits, docroot) -->   create + start a container (not waiting
                                             <--   Made(path="start")   for it to accept)
    SetPool(sizes)                           -->   Done
    Status()                                 -->   PoolStatus
    Shutdown(remove_pool)                    -->   Done, then it exits

`fcrun run` through the fork-server (the thin client, fcrun_cli/fast.py), one run a connection::

    Run(image, args, ...) + SCM_RIGHTS [stdin, stdout, stderr]  -->  create + start, attached to
                                                                     the client's three fds
    Signal(signal)        -->   (no reply) sent on to the container's pid 1
                          <--   Exited(code) once it exited (128+N: signal N); removed right
                                after, under its lock (its name is free when that is released)
    -d:                   <--   Detached(name) at once (output goes to the container's log)
    the client hangs up first: the container is killed and removed.

Any request may get Failed(kind, message, exit_code) instead. The fork-server is the privileged half: it
decodes strictly (unknown fields are an error) and `check_request` re-checks every value
against what fcrun itself would accept, whoever sent it.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Annotated, Union

import msgspec

from ..constraints import MAX_POOL_SIZE  # noqa: F401 - protocol.MAX_POOL_SIZE, as it always was
from ..constraints import MachineCpu, MemoryBytes, PidsMax, PoolSize, spec_error
from ..errors import SpecError
from ..instance import seccomp_from_setting
from ..runrequest import NETWORKS, RunRequest
from ..runtime.state import validate_name

MAX_MESSAGE_BYTES = 1 << 20
MAX_SIGNAL = 64  # SIGRTMAX on Linux
RUN_NETWORKS = NETWORKS
STDIO_FDS = 3  # a foreground Run carries stdin, stdout, stderr (SCM_RIGHTS)
HEADER = struct.Struct(">I")
_IMAGE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}$")


class InstanceLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An app instance's limits as a user gives them (cgroups.Limits holds the kernel's units)."""

    cpu: MachineCpu  # fraction of one CPU
    memory_bytes: MemoryBytes
    pids_max: PidsMax | None = None  # None: instance.DEFAULT_PIDS_MAX


class Start(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Create and start an instance of `image` called `name` (it is not waited for)."""

    image: str
    name: str
    labels: dict[str, str]
    limits: InstanceLimits
    env: list[str] = []
    seccomp: str = "default"  # the app's setting (cmdb App.seccomp): default, unconfined or a profile's JSON
    docroot: str | None = None  # host directory bind-mounted at the image's document root


class Claim(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Hand a pooled instance of `image` to an app: its limits, its docroot, its labels."""

    image: str
    labels: dict[str, str]
    limits: InstanceLimits
    docroot: str | None = None


class SetPool(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """How many pooled instances to keep per image (0 or absent: none)."""

    sizes: dict[str, PoolSize]


class Status(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    pass


class Shutdown(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    remove_pool: bool = True


class Run(RunRequest, tag=True, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`fcrun run`: the command line's options (runrequest.RunRequest), which the fork-server
    turns into a container with the CLI's own `run_spec`, so errors read the same.

    data_root, cgroup_parent, bridge and subnet are the client's settings; a fork-server whose
    own differ refuses with Failed(kind="Mismatch") (the client then runs the container
    itself), as it does for the options it leaves to the CLI (--security-opt, --tmpfs-rootfs,
    --userns: the thin client never sends them).
    """

    data_root: str | None = None
    cgroup_parent: str | None = None
    bridge: str | None = None
    subnet: str | None = None


class Signal(msgspec.Struct, tag=True, frozen=True, forbid_unknown_fields=True):
    """Send `signal` to the pid 1 of this connection's running container (no reply)."""

    signal: Annotated[int, msgspec.Meta(ge=1, le=MAX_SIGNAL)]


Command = Union[Start, Claim, SetPool, Status, Shutdown, Run, Signal]  # what a client may send


class Made(msgspec.Struct, tag=True, frozen=True):
    name: str
    ip: str
    pid: int
    path: str  # "pool" or "start"
    ms: float  # time the fork-server spent on it


class Empty(msgspec.Struct, tag=True, frozen=True):
    reason: str


class Done(msgspec.Struct, tag=True, frozen=True):
    pass


class ImagePool(msgspec.Struct, frozen=True):
    size: int
    ready: int
    warming: int
    claimed: int  # since the fork-server started
    recycled: int
    failures: int
    last_error: str = ""
    memory_bytes: list[int] = []  # cgroup memory use of each ready instance


class PoolStatus(msgspec.Struct, tag=True, frozen=True):
    pid: int
    images: dict[str, ImagePool]


class Failed(msgspec.Struct, tag=True, frozen=True):
    kind: str  # the FcrunError class name ("SpecError", "NotFound", ...)
    message: str
    http_status: int = 502
    exit_code: int = 125  # what `fcrun` exits with for it (a Run's: fcrun.errors.command_exit_code)


class Exited(msgspec.Struct, tag=True, frozen=True):
    """A Run's container exited (code: its exit code, 128+N if signal N killed it); the fork-server
    holds its lock and removes it next."""

    code: int


class Detached(msgspec.Struct, tag=True, frozen=True):
    name: str


Reply = Union[Made, Empty, Done, PoolStatus, Failed, Exited, Detached]

_request_decoder = msgspec.msgpack.Decoder(Command)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_encoder = msgspec.msgpack.Encoder()


def frame(message: Command | Reply) -> bytes:
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def decode_request(body: bytes) -> Command:
    """Decode a request, its fields' types and ranges checked (the annotations above).

    Raises:
        SpecError: naming what is wrong, at msgspec's path (``$.limits.cpu``).
    """
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise spec_error(exc, "bad request") from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"undecodable request: {exc}") from None


def decode_reply(body: bytes) -> Reply:
    return _reply_decoder.decode(body)


def split_frames(buffer: bytearray) -> list[bytes]:
    """Take every complete message body out of `buffer`.

    Raises:
        SpecError: a length above MAX_MESSAGE_BYTES (the connection is then closed).
    """
    bodies = []
    while len(buffer) >= HEADER.size:
        (length,) = HEADER.unpack_from(buffer)
        if length > MAX_MESSAGE_BYTES:
            raise SpecError(f"message of {length} bytes is above the limit of {MAX_MESSAGE_BYTES}")
        if len(buffer) < HEADER.size + length:
            break
        bodies.append(bytes(buffer[HEADER.size:HEADER.size + length]))
        del buffer[:HEADER.size + length]
    return bodies


def check_request(request: Command) -> None:
    """Re-check a request as the privileged side must, however it was made: its fields' types
    and ranges (as decoding checks them), then what a type cannot say.

    Raises:
        SpecError: naming the field, at its path.
    """
    decode_request(_encoder.encode(request))
    match request:
        case Start():
            _check_image(request.image)
            validate_name(request.name, "$.name")
            _check_labels(request.labels)
            _check_env(request.env)
            try:
                seccomp_from_setting(request.seccomp)
            except SpecError as exc:
                raise SpecError(str(exc), "$.seccomp") from None
            _check_docroot(request.docroot)
        case Claim():
            _check_image(request.image)
            _check_labels(request.labels)
            _check_docroot(request.docroot)
        case SetPool():
            for image in request.sizes:
                _check_image(image, f"$.sizes[{image!r}]")
        case Run():
            # Only what the in-process CLI does not check itself; the rest (image name, cpu,
            # memory, pids, env, user, workdir, the spec made of them) is run_spec's, the CLI's
            # own code (ForkServer._run), so errors read the same.
            if request.name is not None:
                validate_name(request.name)
            if request.network not in RUN_NETWORKS:
                raise SpecError(f"network {request.network!r} is not one of {', '.join(RUN_NETWORKS)}", "$.network")
            for i, arg in enumerate(request.args):
                if "\0" in arg:
                    raise SpecError("argument holds a NUL byte", f"$.args[{i}]")


def _check_image(image: str, where: str = "$.image") -> None:
    if not _IMAGE.fullmatch(image):
        raise SpecError(f"invalid image name {image!r}", where)


def _check_labels(labels: dict[str, str]) -> None:
    if len(labels) > 32:
        raise SpecError("more than 32 labels", "$.labels")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key) or len(value) > 1024 or "\0" in value:
            raise SpecError(f"invalid label {key!r}", f"$.labels[{key!r}]")


def _check_env(env: list[str]) -> None:
    for i, item in enumerate(env):
        key, sep, _ = item.partition("=")
        if not sep or not key or "\0" in item:
            raise SpecError(f"environment entry {item!r} is not KEY=VALUE", f"$.env[{i}]")


def _check_docroot(docroot: str | None) -> None:
    if docroot is None:
        return
    if not os.path.isabs(docroot) or "\0" in docroot or os.path.normpath(docroot) != docroot:
        raise SpecError(f"docroot {docroot!r} is not a normalised absolute path", "$.docroot")
    if not os.path.isdir(docroot):
        raise SpecError(f"docroot {docroot} is not a directory", "$.docroot")
