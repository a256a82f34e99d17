"""Registry image references: ``[docker://][HOST[:PORT]/]PATH[:TAG][@sha256:HEX]``.

Pure parsing, no I/O (pull.py does the network part). The grammar follows docker's
distribution ``reference`` package, which skopeo and podman read too:

- the first path component is a registry host when it has a ``.`` or a ``:`` or is
  ``localhost``; otherwise the host is Docker Hub (``docker.io``), and a one-component path
  gets Hub's ``library/`` (``busybox`` is ``docker.io/library/busybox``);
- no tag and no digest means the tag ``latest``; a digest pins the content, and when a tag is
  given too (``app:1.2@sha256:...``) the tag must still point at that digest (pull.py checks);
- only sha256 digests: the store and OCI layouts name everything by sha256.

A local image name (image.py: ``[a-z0-9][a-z0-9._-]*[:tag]``) never has a ``/`` or an ``@``,
so anything with one, or with ``docker://``, is a registry reference (``is_registry_reference``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SpecError
from .image import DEFAULT_TAG, parse_name

TRANSPORT = "docker://"
DOCKER_HUB = "docker.io"
_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")

_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """A parsed, fully qualified registry reference."""

    registry: str  # "docker.io", "127.0.0.1:5000", "[::1]:5000"
    repository: str  # "library/busybox", "team/app"
    tag: str | None  # None only when a digest is given without a tag
    digest: str | None  # "sha256:<64 hex>"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def by_digest(self, digest: str) -> str:
        """``HOST/REPO@DIGEST``: what skopeo fetches once a digest is known (and docker's
        RepoDigests form), so a tag moved meanwhile cannot change what is pulled."""
        return f"{self.registry}/{self.repository}@{digest}"

    def resolved(self, digest: str) -> str:
        """``HOST/REPO[:TAG]@DIGEST``: the reference as given, with the digest it resolved to."""
        tag = f":{self.tag}" if self.tag is not None else ""
        return f"{self.registry}/{self.repository}{tag}@{digest}"

    def by_tag(self) -> str:
        """``HOST/REPO:TAG`` (skopeo refuses a tag and a digest together)."""
        return f"{self.registry}/{self.repository}:{self.tag or DEFAULT_TAG}"

    def local_name(self) -> str:
        """The store's name for the pulled image: the repository's last component and the tag
        (``registry/team/app:1.2`` -> ``app:1.2``; ``:latest`` is dropped as everywhere).

        A digest without a tag names it ``app:sha256-<12 hex>``, so a pinned pull never replaces
        the image that ``app`` (its latest) names.

        Raises:
            SpecError: the result is not a valid image name (too long): give NAME.
        """
        base = self.repository.rsplit("/", 1)[-1]
        if self.tag is not None:
            tag = self.tag
        else:
            assert self.digest is not None  # parse_reference gives one of the two
            tag = "sha256-" + self.digest.removeprefix("sha256:")[:12]
        try:
            return parse_name(f"{base}:{tag}")
        except SpecError:
            raise SpecError(f"cannot name the image of {str(self)!r} after it; give NAME", "NAME") from None


def is_registry_reference(text: str) -> bool:
    """Whether ``text`` names an image in a registry rather than in the local store."""
    return text.startswith(TRANSPORT) or "/" in text or "@" in text


def parse_reference(text: str, where: str = "REF") -> Reference:
    """Parse ``text`` into a fully qualified ``Reference``.

    Raises:
        SpecError: not a reference; the message says which part is wrong, at ``where``.
    """
    rest = text.strip().removeprefix(TRANSPORT)
    if not rest:
        raise SpecError("empty image reference", where)
    name, at, digest = rest.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise SpecError(
            f"invalid digest {digest!r} in image reference {text!r}: use sha256: and 64 lower-case hex digits",
            where,
        )
    tag = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:  # a ':' after the last '/' is the tag; before it, a registry port
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise SpecError(f"invalid tag {tag!r} in image reference {text!r}: use [A-Za-z0-9_.-], at most 128", where)
    registry, slash, path = name.partition("/")
    if not slash or not ("." in registry or ":" in registry or registry == "localhost"):
        registry, path = DOCKER_HUB, name
    elif registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if not _HOST.fullmatch(registry):
        raise SpecError(f"invalid registry host {registry!r} in image reference {text!r}", where)
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise SpecError(
                f"invalid repository path {path!r} in image reference {text!r}: components of "
                "lower-case letters and digits, separated by '.', '_', '__' or '-'",
                where,
            )
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=path, tag=tag, digest=digest if at else None)
