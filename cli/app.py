"""`fcrun app ...`, `fcrun events`, `fcrun stats`: the sites `fcrun serve` runs.

They talk to the running server's admin API when its socket answers, and work on the CMDB
directly when no server runs (new settings are then picked up when serve starts). Where:

- ``FCRUN_ADMIN_URL`` (``http://HOST:PORT`` or ``https://HOST:PORT``, with
  ``FCRUN_ADMIN_TOKEN``; for https, ``FCRUN_ADMIN_CA`` names the CA file or the server's
  self-signed certificate, else the system's CAs are trusted): a remote server; it must
  answer, there is no fallback;
- else ``FCRUN_ADMIN_SOCKET``, else the admin_socket of ``FCRUN_CONFIG``'s file, else
  ``<run root>/admin.sock``;
- direct mode uses the CMDB of ``fcrun --cmdb URL`` (env ``FCRUN_CMDB``), else ``FCRUN_CONFIG``'s
  ``[cmdb] url``, else ``<data root>/cmdb.sqlite3``; and the ``[defaults]`` and
  ``docroot_roots`` of ``FCRUN_CONFIG``.

``FCRUN_CONFIG``'s file is, as for serve, /etc/fcrun/fcrun.toml when the variable is unset and
that file exists.

A ``--docroot`` outside the docroot roots, reached through a symlink or missing is refused by
whichever of the two writes the app (docroot.py), and checked again whenever it is mounted.

The group reads ``ctx.obj.paths`` (a fcrun.paths.Paths) when the main CLI provides it.
Errors are FcrunError subclasses; the main group prints them and exits with their code.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator, Protocol

import click
import msgspec

from fcrun.cmdb import App, AppStats, AppUpdate, Event, Instance, NewApp, open_cmdb
from fcrun_cli.cmdb import chosen_url
from fcrun.cmdb.models import AppDefaults, Scale, check_docroot, check_ready_path, normalize_hostname
from fcrun.units import is_decimal, parse_size
from fcrun.docroot import DEFAULT_DOCROOT_ROOTS
from fcrun_cli.logs import app_logs
from fcrun_cli.node import app_move, placements_of, placements_text
from fcrun.errors import SpecError
from fcrun.runtime.options import parse_env
from fcrun.paths import Paths
from fcrun.seccomp import parse_security_opts
from fcrun.serve.admin_client import AdminClient, LocalAdmin, server_answers
from fcrun.serve.config import ADMIN_SOCKET_NAME, default_config_path, load_config
from fcrun.units import format_bytes, parse_cpu, parse_duration, parse_memory

ADMIN_URL_ENV = "FCRUN_ADMIN_URL"
ADMIN_TOKEN_ENV = "FCRUN_ADMIN_TOKEN"
ADMIN_CA_ENV = "FCRUN_ADMIN_CA"  # https:// only: the CA (or the self-signed certificate) to trust
ADMIN_SOCKET_ENV = "FCRUN_ADMIN_SOCKET"
CONFIG_ENV = "FCRUN_CONFIG"
NONE_WORDS = ("none", "off")  # clear a setting that may be unset: `--max-lifetime off`


class Admin(Protocol):
    """What the commands need: AdminClient (server mode) and LocalAdmin (direct) both have it."""

    def list_apps(self) -> list[App]: ...
    def get_app(self, name: str) -> App: ...
    def add_app(self, spec: NewApp) -> App: ...
    def update_app(self, name: str, update: AppUpdate) -> App: ...
    def remove_app(self, name: str) -> bool: ...
    def scale(self, name: str, request: Scale) -> Scale: ...
    def list_instances(self, app: str | None = None) -> list[Instance]: ...
    def events(self, app: str | None = None, since_id: int | None = None, limit: int = 100) -> list[Event]: ...
    def stats(self, app: str | None = None) -> dict[str, AppStats]: ...
    def close(self) -> None: ...


@contextlib.contextmanager
def connect(ctx: click.Context) -> Iterator[Admin]:
    """The running server's admin API if it answers, else the CMDB directly.

    Resource handling: closes the CMDB (direct mode) on exit.
    """
    url = os.environ.get(ADMIN_URL_ENV)
    if url:
        yield AdminClient(url, os.environ.get(ADMIN_TOKEN_ENV), ca_file=os.environ.get(ADMIN_CA_ENV) or None)
        return
    paths = getattr(ctx.obj, "paths", None) or Paths.from_env()
    config_path = default_config_path(os.environ.get(CONFIG_ENV))  # else /etc/fcrun/fcrun.toml, as serve
    config = load_config(config_path, paths) if config_path else None
    socket_path = (
        os.environ.get(ADMIN_SOCKET_ENV)
        or (config.admin_socket if config else os.path.join(paths.run_root, ADMIN_SOCKET_NAME))
    )
    if os.path.exists(socket_path) and server_answers(socket_path):
        yield AdminClient(socket_path)
        return
    admin = LocalAdmin(open_cmdb(paths, chosen_url(ctx, config)), config.defaults if config else AppDefaults(),
                       docroot_roots=config.docroot_roots if config else DEFAULT_DOCROOT_ROOTS,
                       fcrun_roots=(paths.data_root, paths.run_root))
    try:
        yield admin
    finally:
        admin.close()


# -- options shared by add and update ---------------------------------------------------------


def _settings_options(command):
    options = [
        click.option("--image", "-i", default=None, help="Image the app's instances run (see `fcrun image ls`)."),
        click.option("--alias", "aliases", multiple=True, metavar="HOST",
                     help="Another hostname the app answers to (repeatable; on update it replaces the list)."),
        click.option("--docroot", default=None, metavar="DIR",
                     help="Host directory mounted at the image's document root (/var/www/html for apache-php)."),
        click.option("--cpu", default=None, help="CPU per instance, as a fraction of one CPU (0.3)."),
        click.option("--cpu-max", default=None, help="Ceiling for scaling an instance up (default: --cpu)."),
        click.option("--memory", "-m", default=None, help="Memory per instance (512M, 1G)."),
        click.option("--min", "min_instances", type=int, default=None, help="Instances kept running even when idle."),
        click.option("--max", "max_instances", type=int, default=None, help="Most instances at once."),
        click.option("--target-concurrency", type=int, default=None,
                     help="In-flight requests per instance before scaling out."),
        click.option("--idle-timeout", default=None, help="Stop an instance after this long without requests (60s)."),
        click.option("--freeze-after", default=None,
                     help="Freeze an idle instance after this long (30s; 'off': never). A request thaws it in about a millisecond."),
        click.option("--max-lifetime", default=None,
                     help="Replace an instance older than this (1h; 'off', the default, never)."),
        click.option("--cooldown-up", default=None, help="Least time between two scale-ups (10s)."),
        click.option("--cooldown-down", default=None, help="Least time between two scale-downs (30s)."),
        click.option("--env", "-e", multiple=True, metavar="KEY=VALUE",
                     help="Environment of the instances (repeatable; on update it replaces the list)."),
        click.option("--port", default=None, help="Port the app listens on ('auto': the image's, else 80)."),
        click.option("--max-body", default=None,
                     help="Largest request body (10M; 'off': no limit; 'default': the proxy's max_body_bytes)."),
        click.option("--autoscale/--no-autoscale", default=None, help="Scale out and up with load."),
        click.option("--pids", default=None,
                     help="Most processes and threads per instance (default 1024; 'default' restores it)."),
        click.option("--security-opt", "security_opts", multiple=True, metavar="seccomp=PROFILE",
                     help="seccomp=default|unconfined|PROFILE.json (OCI profile, stored in the CMDB)."),
        click.option("--ready-path", default=None, metavar="PATH",
                     help="An instance gets requests only once GET PATH (Host: the app's name) answers 2xx "
                          "or 3xx, besides accepting connections (/healthz; 'off', the default: accepting is enough)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _changes(opts: dict[str, Any]) -> dict[str, Any]:
    """The settings the options give, parsed; errors name the option."""
    out: dict[str, Any] = {}
    if opts["image"] is not None:
        out["image"] = opts["image"]
    if opts["aliases"]:
        out["hostnames"] = [normalize_hostname(h, "--alias") for h in opts["aliases"]]
    if opts["docroot"] is not None:
        out["docroot"] = _or_none(opts["docroot"], "--docroot", lambda t, f: check_docroot(os.path.abspath(t), f))
    if opts["cpu"] is not None:
        out["cpu"] = parse_cpu(opts["cpu"], "--cpu")
    if opts["cpu_max"] is not None:
        out["cpu_max"] = _or_none(opts["cpu_max"], "--cpu-max", parse_cpu)
    if opts["memory"] is not None:
        out["memory_bytes"] = parse_memory(opts["memory"], "--memory")
    for key in ("min_instances", "max_instances", "target_concurrency"):
        if opts[key] is not None:
            out[key] = opts[key]
    if opts["idle_timeout"] is not None:
        out["idle_timeout_s"] = parse_duration(opts["idle_timeout"], "--idle-timeout")
    if opts["freeze_after"] is not None:
        out["freeze_after_s"] = _or_none(opts["freeze_after"], "--freeze-after", parse_duration)
    if opts["max_lifetime"] is not None:
        out["max_lifetime_s"] = _or_none(opts["max_lifetime"], "--max-lifetime", parse_duration)
    if opts["cooldown_up"] is not None:
        out["cooldown_up_s"] = parse_duration(opts["cooldown_up"], "--cooldown-up")
    if opts["cooldown_down"] is not None:
        out["cooldown_down_s"] = parse_duration(opts["cooldown_down"], "--cooldown-down")
    if opts["env"]:
        out["env"] = parse_env(opts["env"], "--env")
    if opts["port"] is not None:
        out["port"] = None if opts["port"].strip().lower() == "auto" else _parse_port(opts["port"], "--port")
    if opts["max_body"] is not None:
        out["max_body_bytes"] = _max_body(opts["max_body"])
    if opts["pids"] is not None:
        out["pids_max"] = None if opts["pids"].strip().lower() == "default" else _parse_pids(opts["pids"], "--pids")
    if opts["security_opts"]:
        out["seccomp"] = seccomp_setting_text(opts["security_opts"])
    if opts["autoscale"] is not None:
        out["autoscale"] = opts["autoscale"]
    if opts["ready_path"] is not None:
        out["ready_path"] = _or_none(opts["ready_path"], "--ready-path", check_ready_path)
    return out


def _or_none(text: str, flag: str, parse: Callable[[str, str], Any]) -> Any:
    """None for 'off'/'none' (the setting is cleared), else the parsed value."""
    return None if text.strip().lower() in NONE_WORDS else parse(text, flag)


def _max_body(text: str) -> int | None:
    """--max-body: 0 for 'off' (no limit, as the proxy reads 0), None for 'default' (the proxy's
    max_body_bytes applies), else a size."""
    word = text.strip().lower()
    if word == "default":
        return None
    return 0 if word in NONE_WORDS else parse_size(text, "--max-body")


def _max_body_text(limit: int | None) -> str:
    if limit is None:
        return "the proxy's default (max_body_bytes)"
    return "no limit" if limit == 0 else format_bytes(limit)


def _parse_pids(text: str, flag: str) -> int:
    # ASCII digits (isdigit alone takes "²"), and few enough for int(); the range is validate_app's.
    if not is_decimal(text):
        raise SpecError(f"invalid pids limit {text!r}: use a number or 'default'", flag)
    return int(text)


def seccomp_setting_text(opts: tuple[str, ...]) -> str:
    """--security-opt values -> the app's stored seccomp setting (a profile as its JSON)."""
    profile = parse_security_opts(opts)
    return profile if isinstance(profile, str) else msgspec.json.encode(profile).decode()


def _parse_port(text: str, flag: str) -> int:
    if not is_decimal(text, 5) or not 1 <= int(text) <= 65535:
        raise SpecError(f"invalid port {text!r}: use a number in 1..65535 or 'auto'", flag)
    return int(text)


# -- commands ---------------------------------------------------------------------------------


@click.group()
def app():
    """Manage the sites `fcrun serve` runs: each app is a set of hostnames served by
    instances of one image, started on the first request and stopped when idle.

    \b
      fcrun app add example.test --image apache-php --docroot /srv/example --cpu 0.3 --memory 512M
      fcrun app ls
      fcrun app show example.test
      fcrun app update example.test --max 3
      fcrun app scale example.test --instances 2
      fcrun app rm example.test
    """


@app.command("add")
@click.argument("hostname")
@_settings_options
@click.pass_context
def add(ctx: click.Context, hostname: str, **opts):
    """Add an app answering to HOSTNAME (its name) and any --alias."""
    if not opts.get("image"):
        raise SpecError("an app needs an image: give --image (e.g. --image apache-php)", "--image")
    name = normalize_hostname(hostname, "HOSTNAME")
    opts["image"] = _image_from_registry(ctx, opts["image"])
    spec = NewApp(name=name, **_changes(opts))
    with connect(ctx) as admin:
        added = admin.add_app(spec)
    click.echo(added.name)
    _warn_if_image_missing(ctx, added.image)


@app.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="Print names only.")
@click.pass_context
def ls(ctx: click.Context, as_json: bool, quiet: bool):
    """List apps: name, aliases, image, CPU, memory, instances ready/total, requests."""
    with connect(ctx) as admin:
        apps = admin.list_apps()
        stats = admin.stats() if not quiet else {}
    if as_json:
        rows = [{"app": a, "stats": stats.get(a.name, AppStats())} for a in apps]
        click.echo(msgspec.json.format(msgspec.json.encode(rows), indent=2).decode())
        return
    if quiet:
        for a in apps:
            click.echo(a.name)
        return
    table = [("NAME", "ALIASES", "IMAGE", "CPU", "MEMORY", "INSTANCES", "REQUESTS")]
    for a in apps:
        s = stats.get(a.name, AppStats())
        table.append((a.name, ",".join(a.hostnames) or "-", a.image, _cpu_text(a), format_bytes(a.memory_bytes),
                      f"{s.instances.ready}/{s.instances.total}", str(s.requests)))
    _print_table(table)


@app.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool):
    """Show an app's settings, its instances and its metering."""
    with connect(ctx) as admin:
        found = admin.get_app(name)
        stats = admin.stats(found.name).get(found.name, AppStats())
        instances = admin.list_instances(found.name)
        placements = placements_of(admin, found.name)  # None through a server (its API has none)
    if as_json:
        doc = {"app": found, "stats": stats, "instances": instances}
        if placements is not None:
            doc["placements"] = placements
        click.echo(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode())
        return
    rows = [
        ("name", found.name),
        ("aliases", ", ".join(found.hostnames) or "-"),
        ("image", found.image),
        ("docroot", found.docroot or "-"),
        ("env", " ".join(found.env) or "-"),
        ("cpu", _cpu_text(found)),
        ("memory", format_bytes(found.memory_bytes)),
        ("instances", f"{found.min_instances}..{found.max_instances}, target concurrency "
                      f"{found.target_concurrency}, autoscale {'on' if found.autoscale else 'off'}"),
        ("idle timeout", _seconds_text(found.idle_timeout_s)),
        ("freeze after", _seconds_text(found.freeze_after_s)),
        ("max lifetime", _seconds_text(found.max_lifetime_s)),
        ("cooldowns", f"up {_seconds_text(found.cooldown_up_s)}, down {_seconds_text(found.cooldown_down_s)}"),
        ("max body", _max_body_text(found.max_body_bytes)),
        ("port", str(found.port) if found.port is not None else "auto (the image's, else 80)"),
        ("pids", str(found.pids_max) if found.pids_max is not None else "default (1024)"),
        ("seccomp", found.seccomp if found.seccomp in ("default", "unconfined") else "custom profile"),
        ("ready", f"GET {found.ready_path} answers 2xx/3xx" if found.ready_path else "accepting connections"),
        ("generation", f"{found.generation} (updated {_time_text(found.updated_at)})"),
        ("created", _time_text(found.created_at)),
        ("running", f"{stats.instances.ready} ready / {stats.instances.total}"),
        *([("placements", placements_text(placements))] if placements is not None else []),
        ("requests", " ".join([str(stats.requests)] + [f"{k}:{v}" for k, v in sorted(stats.status.items()) if v])),
        ("metering", f"request {stats.request_seconds:.3f}s, cpu {stats.cpu_seconds:.3f}s, "
                     f"instances {stats.instance_seconds:.1f}s"),
    ]
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        click.echo(f"{key + ':':<{width}} {value}")
    if instances:
        click.echo("")
        table = [("INSTANCE", "STATE", "NODE", "ADDRESS", "CPU", "STARTED", "REQUESTS")]
        for i in instances:
            address = f"{i.ip}:{i.port}" if i.ip else "-"
            table.append((i.id, i.state, i.owner or "-", address, f"{i.cpu:g}" if i.cpu is not None else "-",
                          _time_text(i.started_at), str(i.requests)))
        _print_table(table)


@app.command("update")
@click.argument("name")
@_settings_options
@click.option("--clear-aliases", is_flag=True, help="Remove every alias.")
@click.option("--clear-env", is_flag=True, help="Remove every environment entry.")
@click.pass_context
def update(ctx: click.Context, name: str, clear_aliases: bool, clear_env: bool, **opts):
    """Change an app's settings. Running instances keep serving; the next instance uses them."""
    changes = _changes(opts)
    if clear_aliases:
        if "hostnames" in changes:
            raise SpecError("give either --alias or --clear-aliases", "--clear-aliases")
        changes["hostnames"] = []
    if clear_env:
        if "env" in changes:
            raise SpecError("give either --env or --clear-env", "--clear-env")
        changes["env"] = []
    if not changes:
        raise SpecError("nothing to update: give at least one setting (see --help)", "fcrun app update")
    if "image" in changes:
        changes["image"] = _image_from_registry(ctx, changes["image"])
    with connect(ctx) as admin:
        updated = admin.update_app(name, AppUpdate(**changes))
    click.echo(f"{updated.name}: generation {updated.generation}; new instances use the new settings")
    if "image" in changes:
        _warn_if_image_missing(ctx, updated.image)


def _image_from_registry(ctx: click.Context, image: str) -> str:
    """`--image REF` of a registry (`host/repo:tag`, `docker://...`): pull it on first use and
    give the app the image's local name (images/pull.py `ensure_image`). Pulled here, before the
    app is written, so a failed pull adds nothing and serve never waits on a registry.
    A local name is returned as it is.
    """
    import sys

    from fcrun.images.reference import is_registry_reference

    if not is_registry_reference(image):
        return image
    if os.environ.get(ADMIN_URL_ENV):
        raise SpecError(f"{image!r} is a registry reference and the server is remote: pull it on the "
                        "server's host (`fcrun image pull REF`) and give the image's name", "--image")
    from fcrun.images import ImageStore
    from fcrun.images.pull import PullOptions, ensure_image

    paths = getattr(ctx.obj, "paths", None) or Paths.from_env()
    show = sys.stderr.isatty()
    return ensure_image(ImageStore(paths), image, PullOptions.from_env(progress=show),
                        progress=(lambda line: click.echo(line, err=True)) if show else None)


def _warn_if_image_missing(ctx: click.Context, image: str) -> None:
    """Warn (stderr; the app stays added) when `image` is not in the local image store: the
    app's first request would fail to start an instance. Says nothing when a remote server
    (FCRUN_ADMIN_URL) runs the app, or when the store cannot be read (not root): it cannot tell.
    """
    if os.environ.get(ADMIN_URL_ENV):
        return
    from fcrun.errors import NotFound
    from fcrun.images import ImageStore
    from fcrun.images.recipes import list_recipes

    paths = getattr(ctx.obj, "paths", None) or Paths.from_env()
    store = ImageStore(paths)
    try:
        os.listdir(paths.images)
    except FileNotFoundError:
        pass  # no image at all yet
    except OSError:
        return  # the store is unreadable here: whether the image is there is unknown
    try:
        store.get(image)
        return
    except NotFound:
        pass
    how = [f"`fcrun image pull {image}`"]
    if ":" not in image and image in list_recipes(store.recipes_dir):
        how.insert(0, f"`fcrun image build {image}`")
    click.echo(f"fcrun: warning: image {image!r} is not in the local image store ({paths.images}) yet: its "
               f"instances cannot start until it is; get it with {' or '.join(how)}", err=True)


@app.command("scale")
@click.argument("name")
@click.option("--instances", type=int, default=None, help="Run this many instances now (out or in, draining first).")
@click.option("--cpu", default=None, help="Set every running instance's CPU quota now, live (up to --cpu-max).")
@click.pass_context
def scale(ctx: click.Context, name: str, instances: int | None, cpu: str | None):
    """Scale an app now, whether autoscale is on or off: out or in to --instances N, or up or
    down to --cpu X. Needs a running `fcrun serve`. With autoscale on, the policy may change it
    again later (after its cooldowns)."""
    if (instances is None) == (cpu is None):
        raise SpecError("give exactly one of --instances and --cpu", "fcrun app scale")
    request = Scale(instances=instances) if instances is not None else Scale(cpu=parse_cpu(cpu, "--cpu"))
    with connect(ctx) as admin:
        result = admin.scale(name, request)
    if result.cpu is not None:
        click.echo(f"{name}: cpu {result.cpu:g} per running instance")
    else:
        click.echo(f"{name}: {result.instances} instance{'' if result.instances == 1 else 's'}")


@app.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, names: tuple[str, ...]):
    """Remove apps: their instances drain (in-flight requests finish), then stop."""
    with connect(ctx) as admin:
        for name in names:
            if admin.remove_app(name):
                click.echo(f"removed {name}")
            else:
                click.echo(f"{name}: draining; fcrun serve removes it when its instances have stopped")


@click.command("events")
@click.argument("app_name", metavar="[APP]", required=False)
@click.option("--since", "since_id", type=int, default=None, help="Only events after this id.")
@click.option("--limit", "-n", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="Most events to show.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def events(ctx: click.Context, app_name: str | None, since_id: int | None, limit: int, as_json: bool):
    """Show what happened (apps added, instances started, stopped, failed), oldest first."""
    with connect(ctx) as admin:
        found = admin.events(app_name, since_id, limit)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(found), indent=2).decode())
        return
    for e in found:
        click.echo(f"{e.id:>6}  {_time_text(e.ts)}  {e.app or '-'}  {e.kind}  {e.message}")


@click.command("stats")
@click.argument("app_name", metavar="[APP]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def stats(ctx: click.Context, app_name: str | None, as_json: bool):
    """Per-app metering: requests by status class, processing, CPU and instance seconds,
    instances (ready/all, frozen), and how requests that found no ready instance got one
    (thawed / claimed from the pool / started)."""
    with connect(ctx) as admin:
        found = admin.stats(app_name)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(found), indent=2).decode())
        return
    table = [("APP", "REQUESTS", "2XX", "3XX", "4XX", "5XX", "REQUEST-S", "CPU-S", "INSTANCE-S", "INSTANCES",
              "FROZEN", "THAW/POOL/START")]
    for name, s in sorted(found.items()):
        table.append((name, str(s.requests), *(str(s.status.get(c, 0)) for c in ("2xx", "3xx", "4xx", "5xx")),
                      f"{s.request_seconds:.3f}", f"{s.cpu_seconds:.3f}", f"{s.instance_seconds:.1f}",
                      f"{s.instances.ready}/{s.instances.total}", str(s.instances.frozen),
                      "/".join(str(s.cold_paths.get(p, 0)) for p in ("thaw", "pool", "start"))))
    _print_table(table)


# -- formatting -------------------------------------------------------------------------------


def _print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _cpu_text(a: App) -> str:
    return f"{a.cpu:g}" if a.cpu_max is None or a.cpu_max == a.cpu else f"{a.cpu:g} (max {a.cpu_max:g})"


def _seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return "off"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _time_text(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# `fcrun app logs APP` reads log files, not the admin API: it lives with `fcrun logs`.
app.add_command(app_logs, "logs")
# `fcrun app move APP --node NAME` works on the CMDB's placements: it lives with `fcrun node`.
app.add_command(app_move, "move")

__all__ = ["app", "connect", "events", "stats"]
