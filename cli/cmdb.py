"""`fcrun cmdb ...`: the configuration DB itself — its schema, and moving it between backends.

Which CMDB: ``fcrun --cmdb URL`` (env ``FCRUN_CMDB``), else the ``[cmdb] url`` of
``FCRUN_CONFIG``'s file (else of /etc/fcrun/fcrun.toml when present), else
``<data root>/cmdb.sqlite3`` (`chosen_url`, which `fcrun app` uses too). A site moves from
SQLite to PostgreSQL with::

    fcrun cmdb export -o cmdb.json
    fcrun --cmdb postgresql://fcrun@db.example/fcrun cmdb import cmdb.json

and back the same way. The export holds the apps' environments (secrets, often): it is
written private to its owner.
"""

from __future__ import annotations

import os
import sys

import click
import msgspec

from fcrun.atomicfile import write_atomic
from fcrun.cmdb import Dump, open_cmdb
from fcrun.cmdb.migrations import LATEST_VERSION
from fcrun.constraints import spec_error
from fcrun.errors import KernelError
from fcrun.paths import Paths

CONFIG_ENV = "FCRUN_CONFIG"

_dump_decoder = msgspec.json.Decoder(Dump)


def chosen_url(ctx: click.Context, config=None) -> str | None:
    """The CMDB URL the command line, else the configuration, names; None: the default SQLite."""
    url = getattr(ctx.obj, "cmdb_url", None)
    if url:
        return url
    if config is None:
        from fcrun.serve.config import default_config_path, load_config

        path = default_config_path(os.environ.get(CONFIG_ENV))  # else /etc/fcrun/fcrun.toml, as serve
        config = load_config(path, _paths(ctx)) if path else None
    return config.cmdb.url if config is not None else None


def _paths(ctx: click.Context) -> Paths:
    return getattr(ctx.obj, "paths", None) or Paths.from_env()


def _open(ctx: click.Context):
    return open_cmdb(_paths(ctx), chosen_url(ctx))


@click.group()
def cmdb():
    """The configuration DB: its schema, export and import (SQLite <-> PostgreSQL)."""


@cmdb.command()
@click.pass_context
def migrate(ctx: click.Context):
    """Bring the CMDB's schema to this fcrun's version (serve and app also do it when they open
    it; this does it ahead, e.g. before several hosts start)."""
    with _open(ctx) as db:
        found = db.schema_found
        if found == LATEST_VERSION:
            click.echo(f"CMDB {db.where}: schema version {LATEST_VERSION}, nothing to do")
        else:
            click.echo(f"CMDB {db.where}: schema version {found} -> {LATEST_VERSION}")


@cmdb.command()
@click.option("-o", "--output", default="-", metavar="FILE", help="Write here (mode 0600) instead of stdout.")
@click.pass_context
def export(ctx: click.Context, output):
    """Write every app, instance row and event as JSON (one consistent snapshot)."""
    with _open(ctx) as db:
        dump = db.export_dump()
    data = msgspec.json.format(msgspec.json.encode(dump), indent=2) + b"\n"
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        write_atomic(output, data, what="CMDB export")
        click.echo(f"exported {len(dump.apps)} apps, {len(dump.instances)} instances, {len(dump.events)} events "
                   f"to {output}", err=True)


@cmdb.command(name="import")
@click.argument("source", metavar="FILE")
@click.pass_context
def import_(ctx: click.Context, source):
    """Load an export (FILE, or - for stdin) into an empty CMDB: all of it, or nothing."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise KernelError.from_oserror("read CMDB export", source, exc) from None
    try:
        dump = _dump_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise spec_error(exc, source) from None
    with _open(ctx) as db:
        db.import_dump(dump)
        click.echo(f"imported {len(dump.apps)} apps, {len(dump.instances)} instances, {len(dump.events)} events "
                   f"into CMDB {db.where}")
