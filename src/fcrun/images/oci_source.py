"""Where an OCI image's files come from, and reading them safely.

A ``Source`` is an image layout in a directory or a tar (read in place, not unpacked); paths in
it are relative and '/'-separated. Blobs are named by their sha256 digest and are verified
against their descriptor (size and digest) before anything trusts them; JSON blobs are also
capped in size and decoded into a given shape.

The source is hostile too: a layout directory may hold a FIFO or a symlink to /dev/zero where
a blob should be (reading either never ends), or a symlink out of the layout; an archive may
be a compressed bomb or list millions of members. Only regular files inside the layout are
read, and an archive is indexed only up to the import's caps (limits.py).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
from typing import IO, Any

import msgspec

from ..errors import SpecError
from ..units import format_bytes
from .catalog import digest_hex
from .limits import FILES_SETTING, IMAGE_SETTING, ImportLimitExceeded, ImportLimits
from .tarstream import TarRefused, open_archive

_MAX_JSON_BYTES = 16 << 20  # manifests and configs are small; refuse to read a huge "JSON" blob
_CHUNK = 1 << 20
_MAX_LINK_HOPS = 8


class Source:
    """Files of an image layout, in a directory or a tar. Paths are relative, '/'-separated."""

    label: str

    def open(self, path: str) -> IO[bytes]:
        raise NotImplementedError

    def size(self, path: str) -> int:
        raise NotImplementedError

    def has(self, path: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def missing(self, path: str) -> SpecError:
        return SpecError(f"{self.label}: {path} is missing (truncated or incomplete image?)")


class DirectorySource(Source):
    def __init__(self, root: str):
        self.root = root
        self.label = root
        self._real_root = os.path.realpath(root)

    def _path(self, path: str) -> str:
        """The file's path, checked: inside the layout (after symlinks), and a regular file.

        Raises:
            SpecError: the path escapes the layout or is not a regular file.
        """
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts or path.startswith("/"):
            raise SpecError(f"{self.label}: path {path!r} escapes the image layout")
        full = os.path.join(self.root, *parts)
        real = os.path.realpath(full)
        if not real.startswith(self._real_root.rstrip("/") + "/"):
            raise SpecError(f"{self.label}: {path} is a symlink out of the image layout")
        if os.path.lexists(real) and not stat.S_ISREG(os.stat(real).st_mode):
            raise SpecError(f"{self.label}: {path} is not a regular file")
        return real

    def open(self, path: str) -> IO[bytes]:
        real = self._path(path)
        try:
            # O_NONBLOCK: a FIFO swapped in after the check must not block the open forever.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self.missing(path) from None
        except OSError as exc:
            raise SpecError(f"{self.label}: cannot open {path}: {exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SpecError(f"{self.label}: {path} is not a regular file")
        return os.fdopen(fd, "rb")

    def size(self, path: str) -> int:
        try:
            return os.stat(self._path(path)).st_size
        except FileNotFoundError:
            raise self.missing(path) from None

    def has(self, path: str) -> bool:
        try:
            return os.path.isfile(self._path(path))
        except SpecError:
            return False


class TarSource(Source):
    """An image layout inside a tar (plain or gzip). Members are read in place, not unpacked.

    Resource handling: keeps the archive open until ``close()``.
    """

    def __init__(self, path: str, limits: ImportLimits | None = None):
        self.label = path
        limits = limits or ImportLimits()
        try:
            self._tar = open_archive(path)
        except (tarfile.TarError, EOFError, OSError, TarRefused, ValueError) as exc:
            # tarfile lists every compression it tried; the last line is the plain-tar verdict
            reason = (str(exc).splitlines() or [""])[-1].removeprefix("- method tar: ")
            raise SpecError(
                f"{path}: not a readable tar archive (truncated, or not a tar): {reason}"
            ) from None
        try:
            self._members = self._index(limits)
        except ImportLimitExceeded:
            self._tar.close()
            raise
        except (tarfile.TarError, EOFError, OSError, TarRefused, ValueError) as exc:
            self._tar.close()
            raise SpecError(f"{path}: truncated or corrupt tar archive: {exc}") from None
        except BaseException:
            self._tar.close()
            raise

    def _index(self, limits: ImportLimits) -> dict[str, tarfile.TarInfo]:
        """Read the archive's member list, within the caps: a compressed archive is read
        (decompressed) to its end to be indexed, so a bomb must stop at the cap."""
        members: dict[str, tarfile.TarInfo] = {}
        while (member := self._tar.next()) is not None:
            members[_normalize(member.name)] = member
            if len(members) > limits.max_files:
                raise ImportLimitExceeded(
                    f"{self.label}: the archive lists more than {limits.max_files:,} members; "
                    f"raise {FILES_SETTING} if it is trusted"
                )
            if member.offset_data + member.size > limits.max_archive_bytes:
                raise ImportLimitExceeded(
                    f"{self.label}: the archive is larger than "
                    f"{format_bytes(limits.max_archive_bytes)} uncompressed (the image size cap "
                    f"and tar framing for the file cap); raise {IMAGE_SETTING} if it is trusted"
                )
        return members

    def _member(self, path: str) -> tarfile.TarInfo:
        """The regular file ``path`` names, following links inside the archive (a few hops:
        a chain or loop of links is refused, not followed until the stack runs out)."""
        name = _normalize(path)
        for _hop in range(_MAX_LINK_HOPS):
            member = self._members.get(name)
            if member is None:
                raise self.missing(path)
            if member.issym():
                name = _normalize(posixpath.join(posixpath.dirname(name), member.linkname))
            elif member.islnk():
                name = _normalize(member.linkname)
            elif member.isreg():
                return member
            else:
                raise SpecError(f"{self.label}: {path} is not a regular file")
            if name.split("/")[0] == ".." or member.linkname.startswith("/"):
                raise SpecError(f"{self.label}: {path} links out of the archive")
        raise SpecError(f"{self.label}: {path}: more than {_MAX_LINK_HOPS} links to follow")

    def open(self, path: str) -> IO[bytes]:
        try:
            handle = self._tar.extractfile(self._member(path))
        except (tarfile.TarError, KeyError) as exc:
            raise SpecError(f"{self.label}: cannot read {path}: {exc}") from None
        if handle is None:
            raise SpecError(f"{self.label}: {path} is not a regular file")
        return handle

    def size(self, path: str) -> int:
        return self._member(path).size

    def has(self, path: str) -> bool:
        return _normalize(path) in self._members

    def close(self) -> None:
        self._tar.close()


def _normalize(name: str) -> str:
    joined = "/".join(p for p in name.split("/") if p not in ("", "."))
    return posixpath.normpath(joined) if joined else ""


def open_source(path: str, limits: ImportLimits | None = None) -> Source:
    """Open a layout directory or an archive.

    Raises:
        SpecError: the path does not exist or is neither a directory nor a tar.
        ImportLimitExceeded: the archive is bigger than ``limits`` allow.
    """
    if os.path.isdir(path):
        return DirectorySource(path)
    if not os.path.exists(path):
        raise SpecError(f"image path {path!r} does not exist", "PATH")
    if not os.path.isfile(path):
        raise SpecError(f"image path {path!r} is neither a directory nor a file", "PATH")
    return TarSource(path, limits)


# -- reading and checking blobs -----------------------------------------------------------


def blob_path(digest: str, where: str) -> str:
    """``sha256:<hex>`` -> ``blobs/sha256/<hex>``.

    Raises:
        SpecError: not a sha256 digest (the only algorithm OCI requires and fcrun reads).
    """
    return f"blobs/sha256/{digest_hex(digest, where)}"


def verify_blob(source: Source, path: str, digest: str | None, size: int | None) -> int:
    """Hash a blob and compare it with its descriptor. Returns its size.

    Raises:
        SpecError: size or digest mismatch, or the blob is missing or truncated.
    """
    actual_size = source.size(path)
    if size is not None and actual_size != size:
        raise SpecError(
            f"{source.label}: blob {digest or path}: size is {actual_size} bytes, "
            f"its descriptor says {size}"
        )
    sha = hashlib.sha256()
    try:
        with source.open(path) as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
    except (tarfile.TarError, OSError) as exc:
        raise SpecError(
            f"{source.label}: blob {digest or path}: read failed (truncated archive?): {exc}"
        ) from None
    actual = "sha256:" + sha.hexdigest()
    if digest is not None and actual != digest:
        raise SpecError(
            f"{source.label}: blob {path}: digest mismatch: content hashes to {actual}, "
            f"expected {digest}"
        )
    return actual_size


def read_json(source: Source, path: str, digest: str | None, size: int | None, type_: Any) -> Any:
    """Read, verify and decode a JSON blob (``type_``: a Struct, ``dict``, ``list[...]``).

    Raises:
        SpecError: missing, too large, digest mismatch, not JSON, or not of that shape.
    """
    if source.size(path) > _MAX_JSON_BYTES:
        raise SpecError(f"{source.label}: {path} is too large for a JSON document")
    verify_blob(source, path, digest, size)
    with source.open(path) as handle:
        data = handle.read()
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise SpecError(f"{source.label}: {path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"{source.label}: {path} is not valid JSON: {exc}") from None
