"""What an image is: its records, its run config and the rule for its name.

These Structs cross boundaries (image records on disk, ``fcrun image inspect``, the runtime
core), so they are msgspec Structs and nothing here does I/O.
"""

# No `from __future__ import annotations` here: a msgspec Decoder built at import reads these
# Structs' annotations, and string ones are each compiled (~300 compiles across the runtime's
# modules: ~4-6 ms of a `fcrun run` without a fork-server).

import re
import signal

import msgspec

from ..errors import SpecError
from ..units import is_decimal

# A name is what `fcrun run NAME` takes; a tag distinguishes versions of one name.
# "x:latest" and "x" are the same image (the tag "latest" is dropped), as docker reads them.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DEFAULT_TAG = "latest"


class ImageConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How a container of this image runs unless the user says otherwise."""

    entrypoint: list[str] = []
    cmd: list[str] = []
    env: list[str] = []  # "KEY=value"
    workdir: str = "/"
    user: str = ""
    exposed_ports: list[int] = []
    stop_signal: str = "SIGTERM"
    docroot: str | None = (
        None  # where an app's document root is bind-mounted, if the image serves one
    )

    def __post_init__(self) -> None:
        for i, item in enumerate(self.env):
            if "=" not in item or item.startswith("="):
                raise ValueError(f"env[{i}] {item!r} is not KEY=value")
        for i, port in enumerate(self.exposed_ports):
            if not 0 < port < 65536:
                raise ValueError(f"exposed_ports[{i}] {port} is not a port number (1-65535)")
        if not self.workdir.startswith("/"):
            raise ValueError(f"workdir {self.workdir!r} is not an absolute path")
        if self.docroot is not None and not self.docroot.startswith("/"):
            raise ValueError(f"docroot {self.docroot!r} is not an absolute path")
        self.stop_signal = normalize_signal(self.stop_signal)


class Image(msgspec.Struct, kw_only=True):
    """One named image in the store.

    ``layers`` are absolute directories, bottom first; the runtime stacks them as overlayfs
    lower dirs (``lowerdir=":".join(reversed(layers))``) and never writes into them.
    ``diff_ids`` name the same layers by content digest, in the same order; the store keeps a
    layer in ``<layers dir>/<hex of diff_id>``.
    """

    name: str
    id: str  # "sha256:<hex>": imports: the OCI config digest; builds: digest of config + layers
    layers: list[str]
    config: ImageConfig
    created: float
    source: str  # "recipe rootfs/apache-php", the imported path, or "docker://REF@sha256:..." pulled
    size_bytes: int  # bytes of file content in all layers
    diff_ids: list[str] = []
    recipe_hash: str = (
        ""  # for built images: the recipe digest that produced it (the build cache key)
    )
    # pulled images: HOST/REPO@sha256:... of the manifest or index the reference resolved to at
    # the registry (docker's RepoDigests), which pins exactly this image: `fcrun image pull` it.
    repo_digest: str = ""


def parse_name(name: str, where: str = "NAME") -> str:
    """Check an image name and return its canonical form ("x:latest" becomes "x").

    Raises:
        SpecError: the name does not match ``[a-z0-9][a-z0-9._-]{0,62}`` with an optional ``:tag``.
    """
    base, sep, tag = name.partition(":")
    if not _NAME.fullmatch(base):
        raise SpecError(
            f"invalid image name {name!r}: use 1-63 characters [a-z0-9._-] starting with a letter "
            "or digit, optionally followed by :tag",
            where,
        )
    if sep and not _TAG.fullmatch(tag):
        raise SpecError(
            f"invalid image tag {tag!r} in {name!r}: use [A-Za-z0-9_.-], at most 128", where
        )
    return base if not sep or tag == DEFAULT_TAG else name


def normalize_signal(value: str | int) -> str:
    """'SIGWINCH', 'WINCH', 'winch' or '28' -> 'SIGWINCH'.

    Raises:
        ValueError: not a signal this host knows.
    """
    text = str(value).strip()
    try:
        if is_decimal(text, 3):
            return signal.Signals(int(text)).name
        upper = text.upper()
        return signal.Signals[upper if upper.startswith("SIG") else "SIG" + upper].name
    except (KeyError, ValueError):
        raise ValueError(f"stop_signal {value!r} is not a signal name or number") from None
