"""What the CMDB holds: apps, instances, events, and the rules an app's settings must follow.

These Structs cross boundaries (CMDB rows, admin API bodies, the CLI's JSON), so they are
msgspec Structs and nothing here touches the database. Validation is separate from decoding:
a row read back from the CMDB is trusted as it is (its docroot may have gone since), while
everything a user sends goes through `validate_app` before it is written.

The ranges of numbers are the types of App's fields (constraints.py: ``memory_bytes:
MemoryBytes``), checked by `validate_app` when it converts an app. Errors name the field they
are about (``memory_bytes``, ``hostnames[1]``), as the admin API and the CMDB see it; the CLI
parses its flags itself and names the flag (``--memory``).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ..constraints import BigCount, Count, Cpu, MemoryBytes, PidsMax, Port, PositiveCount, PositiveSeconds, Seconds, describe
from ..constraints import spec_error  # noqa: F401 - where the admin API has always imported it from
from ..errors import SpecError
from ..hostnames import normalize_hostname  # also for `from fcrun.cmdb.models import normalize_hostname`

InstanceState = Literal["starting", "ready", "draining", "frozen", "stopped"]
INSTANCE_STATES: tuple[str, ...] = ("starting", "ready", "draining", "frozen", "stopped")

# Built-in defaults for new apps; `fcrun serve`'s config ([defaults]) can change them.
DEFAULT_CPU = 1.0
DEFAULT_MEMORY_BYTES = 512 << 20
DEFAULT_MIN_INSTANCES = 0
DEFAULT_MAX_INSTANCES = 1
DEFAULT_TARGET_CONCURRENCY = 10
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_FREEZE_AFTER_S = 30.0  # frozen (no CPU, quick to thaw) long before it is stopped
DEFAULT_COOLDOWN_UP_S = 10.0
DEFAULT_COOLDOWN_DOWN_S = 30.0
DEFAULT_PORT = 80  # when neither the app nor the image names one

_ENV_KEY = re.compile(r"[^=\s\0]+")
# The kernel's longest argument or environment string (MAX_ARG_STRLEN, 32 pages), its NUL
# included: a longer entry fails every exec of the app's server with E2BIG.
MAX_ENV_ENTRY_BYTES = 32 * 4096 - 1


class App(msgspec.Struct, kw_only=True, frozen=True):
    """A site: the hostnames it answers to and how its instances run.

    ``name`` is the primary hostname; ``hostnames`` are extra aliases. A hostname belongs to
    one app only. ``cpu_max`` None means "same as cpu"; ``port`` None means "the image's first
    exposed port, else 80" (resolved when an instance starts, so a rebuilt image counts).
    """

    name: str
    image: str
    hostnames: list[str] = []
    env: list[str] = []  # "KEY=value"
    docroot: str | None = None  # host directory bind-mounted at the image's document root
    cpu: Cpu = DEFAULT_CPU  # fraction of one CPU
    cpu_max: Cpu | None = None  # ceiling for scale-up
    memory_bytes: MemoryBytes = DEFAULT_MEMORY_BYTES
    min_instances: Count = DEFAULT_MIN_INSTANCES
    max_instances: PositiveCount = DEFAULT_MAX_INSTANCES
    target_concurrency: PositiveCount = DEFAULT_TARGET_CONCURRENCY
    idle_timeout_s: Seconds = DEFAULT_IDLE_TIMEOUT_S
    freeze_after_s: Seconds | None = DEFAULT_FREEZE_AFTER_S  # None: never frozen
    max_lifetime_s: PositiveSeconds | None = None  # None: instances are never replaced for age
    cooldown_up_s: Seconds = DEFAULT_COOLDOWN_UP_S
    cooldown_down_s: Seconds = DEFAULT_COOLDOWN_DOWN_S
    max_body_bytes: BigCount | None = None  # None: the proxy's max_body_bytes (10 MiB); 0: no limit
    port: Port | None = None
    autoscale: bool = True
    created_at: float = 0.0
    updated_at: float = 0.0
    generation: int = 1  # incremented by every update
    pids_max: PidsMax | None = None  # None: instance.DEFAULT_PIDS_MAX
    # "default" (fcrun's default profile), "unconfined" (no filter), or an OCI profile's JSON
    # (stored whole: the file it came from may change or vanish).
    seccomp: str = "default"
    # An HTTP path (GET, with the app's name as Host) that must answer 2xx or 3xx before a new
    # instance gets requests, besides accepting connections; None: accepting is enough.
    ready_path: str | None = None

    @property
    def all_hostnames(self) -> list[str]:
        return [self.name, *self.hostnames]

    @property
    def cpu_ceiling(self) -> float:
        return self.cpu if self.cpu_max is None else self.cpu_max

    def port_for(self, exposed_ports: list[int]) -> int:
        """The port an instance listens on, given the image's exposed ports."""
        return self.port if self.port is not None else image_port(exposed_ports)


def image_port(exposed_ports: list[int]) -> int:
    """The port an instance of an image listens on unless its app says otherwise."""
    return exposed_ports[0] if exposed_ports else DEFAULT_PORT


class AppUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A change to an app: only the fields that are set change. None clears a nullable field.

    A list field (hostnames, env) replaces the whole list. The app's name cannot change.
    """

    image: str | UnsetType = UNSET
    hostnames: list[str] | UnsetType = UNSET
    env: list[str] | UnsetType = UNSET
    docroot: str | None | UnsetType = UNSET
    cpu: float | UnsetType = UNSET
    cpu_max: float | None | UnsetType = UNSET
    memory_bytes: int | UnsetType = UNSET
    min_instances: int | UnsetType = UNSET
    max_instances: int | UnsetType = UNSET
    target_concurrency: int | UnsetType = UNSET
    idle_timeout_s: float | UnsetType = UNSET
    freeze_after_s: float | None | UnsetType = UNSET
    max_lifetime_s: float | None | UnsetType = UNSET
    cooldown_up_s: float | UnsetType = UNSET
    cooldown_down_s: float | UnsetType = UNSET
    max_body_bytes: int | None | UnsetType = UNSET
    port: int | None | UnsetType = UNSET
    autoscale: bool | UnsetType = UNSET
    pids_max: int | None | UnsetType = UNSET
    seccomp: str | UnsetType = UNSET
    ready_path: str | None | UnsetType = UNSET

    def changes(self) -> dict[str, Any]:
        """The fields that are set, by name."""
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not UNSET}


class NewApp(AppUpdate, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What `app add` / POST /apps sends: a name and an image; unset fields take the defaults."""

    name: str
    image: str


# What a new app takes from serve's [defaults] (AppDefaults) when it does not say otherwise:
# these fields of App, with App's types (ranges included) and built-in defaults, so that the two
# cannot drift apart. `check_defaults` applies the rules an app's own settings follow.
DEFAULTABLE_FIELDS = ("cpu", "memory_bytes", "min_instances", "max_instances", "target_concurrency",
                      "idle_timeout_s", "freeze_after_s", "max_lifetime_s", "cooldown_up_s", "cooldown_down_s",
                      "max_body_bytes", "autoscale")
AppDefaults = msgspec.defstruct(
    "AppDefaults",
    [(f.name, f.type, f.default) for f in msgspec.structs.fields(App) if f.name in DEFAULTABLE_FIELDS],
    kw_only=True, forbid_unknown_fields=True, frozen=True, module=__name__,
)
AppDefaults.__doc__ = "Settings a new app gets when it does not say otherwise (serve config ``[defaults]``)."


class Instance(msgspec.Struct, kw_only=True, frozen=True):
    """One running (or starting, draining) container of an app, as the CMDB records it."""

    id: str
    app: str
    container: str
    state: InstanceState
    ip: str = ""
    port: Annotated[int, Meta(ge=0, le=65535)] = 0  # 0 until known
    cpu: float | None = None  # the CPU limit it runs with (after scale-up)
    started_at: float = 0.0
    last_request_at: float | None = None
    requests: BigCount = 0
    owner: str = ""  # the serve (node: host and run root) that runs it; '' before schema 3


class Event(msgspec.Struct, kw_only=True, frozen=True):
    """Something that happened: an app added, an instance started or failed to start."""

    id: BigCount
    ts: float
    app: str | None
    kind: str
    message: str
    data: dict[str, Any] = {}


class InstanceCounts(msgspec.Struct, kw_only=True):
    ready: int = 0  # serving (a replacing instance serves until its successor is ready)
    total: int = 0  # live instances: ready + frozen + draining (starting ones are not yet instances)
    frozen: int = 0  # frozen or being frozen
    draining: int = 0
    starting: int = 0  # starts in progress (cold start, scale-out, replacement, pool claim)


class Histogram(msgspec.Struct, kw_only=True):
    """A cumulative histogram as Prometheus keeps one: counts[i] observations <= bounds[i],
    counts[-1] all of them (+Inf, == count); sum of the values observed (seconds)."""

    bounds: list[float] = []  # bucket upper bounds, ascending, seconds
    counts: list[int] = msgspec.field(default_factory=lambda: [0])  # cumulative, len(bounds) + 1
    sum: float = 0.0
    count: int = 0


class AppStats(msgspec.Struct, kw_only=True):
    """Metering for one app (the talk's billing by processing time); GET /stats maps name -> this."""

    requests: int = 0
    status: dict[str, int] = {}  # "2xx" -> count
    failed: int = 0
    request_seconds: float = 0.0  # first request byte to last response byte
    cpu_seconds: float = 0.0  # container CPU time (cgroup)
    instance_seconds: float = 0.0  # time instances existed
    instances: InstanceCounts = msgspec.field(default_factory=InstanceCounts)
    starts: int = 0
    cold_start_ms_avg: float | None = None
    cold_paths: dict[str, int] = {}  # requests that waited for an instance, by how it came: thaw/pool/start
    freezes: int = 0
    memory_bytes: int = 0  # cgroup memory of its live instances now
    frozen_memory_bytes: int = 0  # of which frozen ones hold
    request_duration: Histogram = msgspec.field(default_factory=Histogram)  # as request_seconds, per request
    cold_start_duration: dict[str, Histogram] = {}  # a request's wait for an instance, by path (as cold_paths)

class Scale(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """POST /apps/{name}/scale: a number of instances (scale out/in) or a CPU amount (scale up/down)."""

    instances: int | None = None
    cpu: float | None = None


# -- validation ------------------------------------------------------------------------------


def check_docroot(path: str, where: str = "docroot", *, exists: bool = True) -> str:
    """An absolute path to an existing directory (with `exists`), normalized.

    Raises:
        SpecError: relative, missing or not a directory.
    """
    if not path or not os.path.isabs(path) or "\0" in path:
        raise SpecError(f"document root {path!r} is not an absolute path", where)
    if exists and not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise SpecError(f"document root {path} {what}", where)
    return os.path.normpath(path)


READY_PATH_MAX = 2048  # bytes; a readiness probe's request line stays small


def check_ready_path(path: str, where: str = "ready_path") -> str:
    """An origin-form HTTP path for readiness probes: a leading /, printable ASCII only (spaces,
    control characters and other text percent-encoded), so it is sent as it is on the request line.

    Raises:
        SpecError: naming `where`.
    """
    if not path.startswith("/"):
        raise SpecError(f"ready path {path!r} does not start with /", where)
    if len(path) > READY_PATH_MAX:
        raise SpecError(f"ready path is {len(path)} characters long, more than {READY_PATH_MAX}", where)
    bad = next((c for c in path if not "!" <= c <= "~"), None)
    if bad is not None:
        raise SpecError(f"ready path {path!r} holds {bad!r}: percent-encode spaces, control characters and "
                        "non-ASCII text", where)
    return path


def validate_app(app: App, *, host_paths: bool = True) -> App:
    """Check every setting of an app and return it normalized (hostnames lowercased, paths
    normalized, the image name canonical). `host_paths=False`: the docroot is checked as a
    path only, not on this host (an import of another host's CMDB).

    Raises:
        SpecError: naming the first bad field (``hostnames[1]``, ``memory_bytes``).
    """
    from ..images import parse_name  # the image store owns the rule for image names

    try:  # every field's type and range, as App's annotations say (msgspec checks them on conversion)
        app = msgspec.convert(msgspec.to_builtins(app), App)
    except msgspec.ValidationError as exc:
        message, location = describe(exc)
        raise SpecError(message, location.removeprefix("$.")) from None
    name = normalize_hostname(app.name, "name")
    if not app.image.strip():
        raise SpecError("image name is empty", "image")
    image = parse_name(app.image.strip(), "image")

    hostnames: list[str] = []
    seen = {name}
    for i, alias in enumerate(app.hostnames):
        host = normalize_hostname(alias, f"hostnames[{i}]")
        if host in seen:
            raise SpecError(f"hostname {host!r} is listed twice", f"hostnames[{i}]")
        seen.add(host)
        hostnames.append(host)

    for i, item in enumerate(app.env):
        key, sep, _ = item.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise SpecError(f"environment entry {item[:100]!r} is not KEY=value", f"env[{i}]")
        if "\0" in item:  # execve takes C strings: the server could never start
            raise SpecError(f"environment entry {key}=... holds a NUL character", f"env[{i}]")
        if len(item.encode()) > MAX_ENV_ENTRY_BYTES:
            raise SpecError(f"environment entry {key}=... is {len(item.encode())} bytes: the kernel takes "
                            f"at most {MAX_ENV_ENTRY_BYTES}", f"env[{i}]")

    docroot = None if app.docroot is None else check_docroot(app.docroot, "docroot", exists=host_paths)
    if app.cpu_max is not None and app.cpu_max < app.cpu:
        raise SpecError(f"cpu_max {app.cpu_max:g} is below cpu {app.cpu:g}", "cpu_max")
    if app.min_instances > app.max_instances:
        raise SpecError(
            f"min_instances {app.min_instances} is above max_instances {app.max_instances}", "min_instances"
        )
    if app.seccomp not in ("default", "unconfined"):
        from ..seccomp import parse_profile

        try:
            parse_profile(app.seccomp.encode(), "the app's seccomp profile")
        except SpecError as exc:
            raise SpecError(f"{exc}: use 'default', 'unconfined' or an OCI seccomp profile", "seccomp") from None
    if app.ready_path is not None:
        check_ready_path(app.ready_path)
    return msgspec.structs.replace(app, name=name, image=image, hostnames=hostnames, docroot=docroot)


def check_defaults(defaults: AppDefaults) -> None:
    """Raises SpecError naming the bad field, as `validate_app` would for an app."""
    validate_app(App(name="defaults.invalid", image="defaults", **msgspec.structs.asdict(defaults)))


def new_app(spec: NewApp, defaults: AppDefaults, now: float) -> App:
    """The App that `spec` describes, unset fields taken from `defaults`, validated.

    Raises:
        SpecError: naming the bad field.
    """
    fields = msgspec.structs.asdict(defaults)
    fields.update(spec.changes())
    return validate_app(App(**fields, created_at=now, updated_at=now, generation=1))


def apply_update(app: App, update: AppUpdate, now: float) -> App:
    """`app` with `update`'s fields changed, the generation bumped, validated.

    Raises:
        SpecError: naming the bad field.
    """
    return validate_app(
        msgspec.structs.replace(app, **update.changes(), updated_at=now, generation=app.generation + 1)
    )
