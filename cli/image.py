"""`fcrun image ...`: build, import, pull, list, inspect and remove images.

The group reads two optional attributes of the click context object, so the main CLI decides
where the data lives and how to tell whether a container uses an image:

- ``ctx.obj.paths``: a ``fcrun.paths.Paths`` (default ``Paths.from_env()``);
- ``ctx.obj.image_in_use``: ``Callable[[Image], list[str]]`` returning the names of containers
  that use an image (default: none, so ``rm`` does not check).
"""

from __future__ import annotations

import datetime
import functools
import sys
from typing import Any, Callable

import click
import msgspec

from fcrun.errors import FcrunError
from fcrun.images import Image, ImageStore
from fcrun.images.limits import DEFAULT_MAX_FILES, ImportLimits
from fcrun.paths import Paths
from fcrun.units import format_bytes, parse_size


def _store(ctx: click.Context) -> ImageStore:
    paths = getattr(ctx.obj, "paths", None) or Paths.from_env()
    return ImageStore(paths)


def _reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn fcrun's errors into a one-line message and the error's exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FcrunError as exc:
            click.echo(f"fcrun: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _progress(line: str) -> None:
    click.echo(line, err=True)


@click.group("image")
def image() -> None:
    """Build, import, pull, list and remove images."""


@image.command("build")
@click.argument("recipe")
@click.option(
    "--rebuild", is_flag=True, help="Build even if the recipe is unchanged since the last build."
)
@click.pass_context
@_reports_errors
def build(ctx: click.Context, recipe: str, rebuild: bool) -> None:
    """Build image RECIPE from rootfs/RECIPE/ (build.sh and image.toml)."""
    built = _store(ctx).build(recipe, rebuild=rebuild, progress=_progress)
    click.echo(f"{built.name} {built.id}")


@image.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.argument("name", required=False)
@click.option("--max-layer-size", default="4G", show_default=True,
              help="Refuse a layer bigger than this uncompressed (tar read or files written).")
@click.option("--max-image-size", default="8G", show_default=True,
              help="Refuse an image whose new layers are bigger than this together.")
@click.option("--max-files", default=DEFAULT_MAX_FILES, show_default=True, type=int,
              help="Refuse an image with more files than this (all layers).")
@click.pass_context
@_reports_errors
def import_(
    ctx: click.Context,
    path: str,
    name: str | None,
    max_layer_size: str,
    max_image_size: str,
    max_files: int,
) -> None:
    """Import an OCI layout directory, OCI archive or docker-archive tarball.

    NAME defaults to the image's own reference, else the file name. The caps stop
    decompression and sparse-file bombs while they stream; nothing is kept of a refused image.
    """
    limits = ImportLimits(
        max_layer_bytes=parse_size(max_layer_size, "--max-layer-size", "layer size", "4G"),
        max_image_bytes=parse_size(max_image_size, "--max-image-size", "image size", "8G"),
        max_files=max_files,
    )
    imported = _store(ctx).import_(path, name, progress=_progress, limits=limits)
    click.echo(f"{imported.name} {imported.id}")


@image.command("pull")
@click.argument("ref")
@click.argument("name", required=False)
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="The image of this platform from a multi-arch index. [default: this host's]")
@click.option("--tls-verify", type=click.BOOL, default=None,
              help="--tls-verify=false: a local plain-HTTP registry. [default: HTTPS with a verified "
                   "certificate, unless registries.conf marks the registry insecure]")
@click.option("--authfile", type=click.Path(dir_okay=False), default=None,
              help="Registry credentials (skopeo's auth file). [default: the one `skopeo login` writes]")
@click.option("--timeout", "timeout", default="10m", show_default=True,
              help="Give up on the registry after this long (each of the two registry calls).")
@click.option("--progress/--quiet", default=None,
              help="Print each blob and step on stderr. [default: when stderr is a terminal]")
@click.option("--max-layer-size", default="4G", show_default=True, help="As for `fcrun image import`.")
@click.option("--max-image-size", default="8G", show_default=True, help="As for `fcrun image import`.")
@click.option("--max-files", default=DEFAULT_MAX_FILES, show_default=True, type=int,
              help="As for `fcrun image import`.")
@click.pass_context
@_reports_errors
def pull(
    ctx: click.Context,
    ref: str,
    name: str | None,
    platform: str | None,
    tls_verify: bool | None,
    authfile: str | None,
    timeout: str,
    progress: bool | None,
    max_layer_size: str,
    max_image_size: str,
    max_files: int,
) -> None:
    """Pull image REF from an OCI/Docker registry (through skopeo) and store it as NAME.

    \b
      fcrun image pull docker.io/library/busybox:1.36
      fcrun image pull registry.example:5000/team/app:2.1@sha256:<64 hex>   # pinned
      fcrun image pull --tls-verify=false 127.0.0.1:5000/app:dev

    NAME defaults to REF's last path component and tag (app:2.1; a digest alone: app:sha256-<12
    hex>). A digest in REF pins the image: a registry with other content is refused. The record
    keeps the digest REF resolved to (`fcrun image inspect`: repo_digest).
    """
    from fcrun.images.pull import PullOptions
    from fcrun.images.pull import pull as pull_image
    from fcrun.units import parse_duration

    show = sys.stderr.isatty() if progress is None else progress
    options = PullOptions.from_env(platform=platform, tls_verify=tls_verify, authfile=authfile,
                          timeout_s=parse_duration(timeout, "--timeout"), progress=show)
    limits = ImportLimits(
        max_layer_bytes=parse_size(max_layer_size, "--max-layer-size", "layer size", "4G"),
        max_image_bytes=parse_size(max_image_size, "--max-image-size", "image size", "8G"),
        max_files=max_files,
    )
    pulled = pull_image(_store(ctx), ref, name, options, progress=_progress if show else None, limits=limits)
    click.echo(f"{pulled.name} {pulled.id} {pulled.repo_digest}")


@image.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the image records as JSON.")
@click.pass_context
@_reports_errors
def ls(ctx: click.Context, as_json: bool) -> None:
    """List images: name, id, size, created, source."""
    images = _store(ctx).list()
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(images)).decode())
        return
    rows = [("NAME", "ID", "SIZE", "CREATED", "SOURCE")] + [_row(i) for i in images]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])


def _row(img: Image) -> tuple[str, str, str, str, str]:
    created = datetime.datetime.fromtimestamp(img.created).strftime("%Y-%m-%d %H:%M:%S")
    return (
        img.name,
        img.id.removeprefix("sha256:")[:12],
        format_bytes(img.size_bytes),
        created,
        img.source,
    )


@image.command("inspect")
@click.argument("name")
@click.pass_context
@_reports_errors
def inspect(ctx: click.Context, name: str) -> None:
    """Print image NAME's record as JSON."""
    click.echo(msgspec.json.format(msgspec.json.encode(_store(ctx).get(name))).decode())


@image.command("rm")
@click.argument("name")
@click.pass_context
@_reports_errors
def rm(ctx: click.Context, name: str) -> None:
    """Remove image NAME (refused while a container uses it)."""
    removed = _store(ctx).remove(name, in_use=getattr(ctx.obj, "image_in_use", None))
    click.echo(f"removed {removed.name} {removed.id}")
