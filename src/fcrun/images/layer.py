"""Layers on disk: safe extraction of a layer tar, and the digest of a built tree.

A layer is a directory in overlayfs' own format, so the runtime can stack layers as lower dirs
without flattening them: an OCI whiteout ``.wh.NAME`` becomes a character device 0:0 named NAME,
and an opaque marker ``.wh..wh..opq`` becomes the xattr ``trusted.overlay.opaque="y"`` on its
directory (Documentation/filesystems/overlayfs.rst, "whiteouts and opaque directories").

The tar is hostile input. Extraction never follows a symlink: every parent directory is opened
with O_NOFOLLOW relative to its own parent's fd, starting from the layer root, so a member
cannot write outside the layer even after an earlier member planted ``a -> /etc``. Members are
also refused when their name or hard-link target is absolute or contains ``..``, and when they
are device nodes (other than the 0:0 whiteout), when a path is longer than PATH_MAX or deeper
than ``MAX_PATH_DEPTH``, and when a header field (mtime, owner) is out of range. Nothing is
extracted with ``tarfile.extractall``; headers are read by tarstream.py, which bounds them.

What a layer may cost is counted while it streams (limits.py): every uncompressed byte read,
every byte written, every file made. A cap crossed stops the extraction there.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import math
import os
import shutil
import stat
import tarfile
import zlib
from typing import IO, Callable, Protocol

from ..errors import FcrunError, KernelError, SpecError
from .limits import ImportBudget, ImportLimits
from .tarstream import TarRefused, open_stream

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
# xattrs from a layer that are applied; trusted.* and others are dropped on purpose: a layer
# must not be able to plant overlayfs' own trusted.overlay.* attributes (redirect, metacopy).
KEPT_XATTRS = ("security.capability",)
KEPT_XATTR_PREFIXES = ("user.",)

# Linux's PATH_MAX, with its NUL: a longer name could not be opened by path in the container.
MAX_PATH_BYTES = 4095
# Real trees are a few dozen levels deep; deletion (shutil.rmtree) recurses once per level.
MAX_PATH_DEPTH = 256
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "leave unchanged" to chown(2)
_MAX_MTIME_S = 1 << 33  # year 2242; os.utime takes nanoseconds in a signed 64-bit value

_CHUNK = 1 << 20
_MAX_READS_AT_END = 64
_HOST_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EPERM)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OverlayMarks(Protocol):
    """How whiteouts and opaque directories are written; tests may record them instead."""

    def whiteout(self, dir_fd: int, name: str) -> None:
        ...

    def opaque(self, dir_fd: int) -> None:
        ...


class KernelOverlayMarks:
    """overlayfs' on-disk format. Needs CAP_MKNOD and CAP_SYS_ADMIN (trusted.* xattrs)."""

    def whiteout(self, dir_fd: int, name: str) -> None:
        # overlayfs itself creates whiteouts as mode-0 character devices 0:0.
        os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)

    def opaque(self, dir_fd: int) -> None:
        os.setxattr(dir_fd, OVERLAY_OPAQUE_XATTR, b"y")


class HashingReader:
    """A read-only stream that hashes (and counts) what passes through it.

    ``on_read`` is told the size of each chunk read, and may raise to stop the stream (a
    decompression bomb stops at the cap, not at its end).
    """

    def __init__(self, raw: IO[bytes], on_read: Callable[[int], None] | None = None):
        self._raw = raw
        self._on_read = on_read
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0
        self._reads_at_end = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = _CHUNK  # never one unbounded read of a decompressing stream
        data = self._raw.read(size)
        if not data and size:
            # A reader that keeps asking at the end is looping (tarfile skipping data that
            # is not there): stop it rather than spin.
            self._reads_at_end += 1
            if self._reads_at_end > _MAX_READS_AT_END:
                raise EOFError("read past the end of the stream")
        self.sha256.update(data)
        self.bytes_read += len(data)
        if self._on_read is not None:
            self._on_read(len(data))
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


class LayerExtractor:
    """Extracts one layer tar into an empty directory, in overlayfs format.

    ``label`` names the layer in errors (its blob digest). Owners are kept when running as
    root (``same_owner``), numerically: a container's uid 33 is www-data whatever the host's
    /etc/passwd says. ``budget`` counts files and bytes written against the import's caps
    (default: a budget of its own with the default caps).

    Resource handling: holds an fd on the layer root from construction until ``close()``.
    """

    def __init__(
        self,
        root: str,
        label: str,
        marks: OverlayMarks | None = None,
        same_owner: bool | None = None,
        budget: ImportBudget | None = None,
    ):
        self.root = root
        self.label = label
        self.marks = marks or KernelOverlayMarks()
        self.same_owner = os.geteuid() == 0 if same_owner is None else same_owner
        self.budget = budget or ImportBudget(ImportLimits())
        self.content_bytes = 0
        self._root_fd = os.open(root, _DIR_FLAGS)
        # path parts -> the last entry for that directory (a later duplicate wins)
        self._dir_attrs: dict[tuple[str, ...], tarfile.TarInfo] = {}

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> "LayerExtractor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the walk -------------------------------------------------------------------------

    def extract(self, stream: IO[bytes]) -> None:
        """Extract every member of the uncompressed tar ``stream``.

        Raises:
            SpecError: a member is unsafe, or the tar is truncated or corrupt.
            ImportLimitExceeded: a cap of the budget is crossed.
            KernelError: the host failed a write (ENOSPC, EIO), naming the path.
        """
        try:
            with open_stream(stream) as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # tarfile keeps every member; a stream needs none back
                    self.budget.add_files()
                    if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                        self.budget.check_read(member.size)  # its data is read or skipped next
                    self._extract_member(tar, member)
            # Directory modes and times last, deepest first: creating children changes a
            # directory's mtime, and a read-only mode must not stop its children being written.
            for parts in sorted(self._dir_attrs, key=len, reverse=True):
                self._apply_dir_attrs(list(parts), self._dir_attrs[parts])
        except FcrunError:
            raise
        except TarRefused as exc:
            raise SpecError(f"layer {self.label}: {exc}") from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise SpecError(f"layer {self.label}: truncated or corrupt tar: {exc}") from None
        except (ValueError, OverflowError) as exc:  # a header field tarfile could not take
            raise SpecError(f"layer {self.label}: corrupt tar header: {exc}") from None

    def _extract_member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = self._parts(member.name, member.name)
        self._check_header(member)
        if not parts:  # "./": the layer root itself
            if member.isdir():
                self._dir_attrs[()] = member
            return
        leaf = parts[-1]
        try:
            parent_fd = self._open_dir(parts[:-1], member.name, create=True)
        except OSError as exc:
            raise self._os_error("open the directory of", member.name, exc) from None
        try:
            if leaf == OPAQUE_MARKER:
                self.marks.opaque(parent_fd)
            elif leaf.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                pass  # other aufs metadata (.wh..wh.plnk, .wh..wh.aufs): not content
            elif leaf.startswith(WHITEOUT_PREFIX):
                hidden = leaf.removeprefix(WHITEOUT_PREFIX)
                if hidden in ("", ".", ".."):
                    raise self._refused(member.name, "bad whiteout name")
                self._remove(parent_fd, hidden)
                self.marks.whiteout(parent_fd, hidden)
            elif member.isdir():
                self._make_dir(parent_fd, leaf, member)
                self._dir_attrs[tuple(parts)] = member
            elif member.isreg():
                self._remove(parent_fd, leaf)
                self._write_file(tar, member, parent_fd, leaf)
            elif member.issym():
                if not member.linkname or "\0" in member.linkname:
                    raise self._refused(member.name, f"bad symlink target {member.linkname!r}")
                self._remove(parent_fd, leaf)
                # The target is stored as text and never followed here; inside the container it
                # resolves against the container's root.
                os.symlink(member.linkname, leaf, dir_fd=parent_fd)
                self._apply_attrs(member, leaf, parent_fd)
            elif member.islnk():
                self._remove(parent_fd, leaf)
                self._hard_link(member, parent_fd, leaf)
            elif member.isfifo():
                self._remove(parent_fd, leaf)
                os.mkfifo(leaf, 0o600, dir_fd=parent_fd)
                self._apply_attrs(member, leaf, parent_fd)
            elif member.ischr() and member.devmajor == 0 and member.devminor == 0:
                # Already in overlay format (some tools tar an overlay upper dir as is).
                self._remove(parent_fd, leaf)
                self.marks.whiteout(parent_fd, leaf)
            elif member.ischr() or member.isblk():
                kind = "character" if member.ischr() else "block"
                raise self._refused(
                    member.name,
                    f"{kind} device {member.devmajor}:{member.devminor}: device nodes are not "
                    "allowed in image layers (the runtime provides /dev)",
                )
            else:
                raise self._refused(member.name, f"unsupported member type {member.type!r}")
        except OSError as exc:
            raise self._os_error("extract", member.name, exc) from None
        finally:
            if parent_fd != self._root_fd:
                os.close(parent_fd)

    def _refused(self, member_name: str, why: str) -> SpecError:
        return SpecError(f"layer {self.label}: member {member_name!r}: {why}")

    def _os_error(self, operation: str, member_name: str, exc: OSError) -> FcrunError:
        """A full disk or missing privilege is the host's problem; anything else, the layer's.

        A host error names the path written, so "No space left on device" says which disk.
        """
        if exc.errno in _HOST_ERRNOS:
            path = os.path.join(self.root, member_name.lstrip("/"))
            return KernelError.from_oserror(operation, f"{path} (layer {self.label})", exc)
        return SpecError(f"{operation} member {member_name!r} of layer {self.label}: {exc}")

    def _parts(self, name: str, member_name: str) -> list[str]:
        if "\0" in name:
            raise self._refused(member_name, "NUL in path")
        if name.startswith("/"):
            raise self._refused(member_name, f"absolute path {name!r} escapes the layer")
        if len(os.fsencode(name)) > MAX_PATH_BYTES:
            raise self._refused(member_name, f"path is longer than {MAX_PATH_BYTES} bytes")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self._refused(member_name, f"path {name!r} escapes the layer with '..'")
        if len(parts) > MAX_PATH_DEPTH:
            raise self._refused(member_name, f"path is deeper than {MAX_PATH_DEPTH} levels")
        return parts

    def _check_header(self, member: tarfile.TarInfo) -> None:
        """Fields the kernel would refuse (or misread) are refused here, by name."""
        if not (math.isfinite(member.mtime) and abs(member.mtime) < _MAX_MTIME_S):
            raise self._refused(member.name, f"mtime {member.mtime} is out of range")
        for field in ("uid", "gid"):
            if not 0 <= getattr(member, field) <= MAX_ID:
                raise self._refused(member.name, f"{field} {getattr(member, field)} is out of range")

    def _open_dir(self, parts: list[str], member_name: str, create: bool) -> int:
        """Open the directory ``parts`` below the root without following any symlink.

        Resource handling: returns a new fd the caller closes (or the root fd for ``[]``).
        """
        fd = self._root_fd
        walked: list[str] = []
        try:
            for part in parts:
                walked.append(part)
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise self._refused(
                            member_name, f"{'/'.join(walked)!r} does not exist in this layer"
                        ) from None
                    # A tar may list a file before its directory; the directory's own entry,
                    # if it comes, sets mode and owner later. It is a file made all the same.
                    self.budget.add_files()
                    os.mkdir(part, 0o755, dir_fd=fd)
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    what = (
                        "a symlink"
                        if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode)
                        else "not a directory"
                    )
                    raise self._refused(
                        member_name,
                        f"{'/'.join(walked)!r} is {what}; refusing to write through it",
                    ) from None
                if fd != self._root_fd:
                    os.close(fd)
                fd = next_fd
        except BaseException:
            if fd != self._root_fd:
                os.close(fd)
            raise
        return fd

    # -- one entry ------------------------------------------------------------------------

    def _remove(self, dir_fd: int, name: str) -> None:
        """Remove ``name`` if this layer already has it (a later member replaces an earlier one)."""
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def _make_dir(self, dir_fd: int, name: str, member: tarfile.TarInfo) -> None:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
            os.mkdir(name, 0o700, dir_fd=dir_fd)

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, dir_fd: int, name: str
    ) -> None:
        source = tar.extractfile(member)
        assert source is not None  # a regular file always has a data stream
        fd = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            self.budget.check_write(member.size)
            remaining = member.size
            while remaining > 0:
                chunk = source.read(min(_CHUNK, remaining))
                if not chunk:
                    raise self._refused(member.name, "truncated file data")
                self.budget.add_written(len(chunk))
                os.write(fd, chunk)  # regular files on a local fs: no short writes short of ENOSPC
                remaining -= len(chunk)
            self.content_bytes += member.size
            self._apply_attrs(member, fd, None)
        finally:
            os.close(fd)

    def _hard_link(self, member: tarfile.TarInfo, dir_fd: int, name: str) -> None:
        if member.linkname.startswith("/"):
            raise self._refused(member.name, f"hard link to absolute path {member.linkname!r}")
        target = self._parts(member.linkname, member.name)
        if not target:
            raise self._refused(member.name, "hard link to the layer root")
        target_dir = self._open_dir(target[:-1], member.name, create=False)
        try:
            try:
                st = os.lstat(target[-1], dir_fd=target_dir)
            except FileNotFoundError:
                raise self._refused(
                    member.name, f"hard link target {member.linkname!r} is not in this layer"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise self._refused(member.name, f"hard link to directory {member.linkname!r}")
            os.link(
                target[-1], name, src_dir_fd=target_dir, dst_dir_fd=dir_fd, follow_symlinks=False
            )
        finally:
            if target_dir != self._root_fd:
                os.close(target_dir)

    def _apply_attrs(self, member: tarfile.TarInfo, path: int | str, dir_fd: int | None) -> None:
        """Owner, mode, xattrs and mtime, in that order (chown clears setuid bits).

        ``path`` is an fd (files, directories) or a name in ``dir_fd`` (symlinks, FIFOs).
        """
        by_name = {} if isinstance(path, int) else {"dir_fd": dir_fd, "follow_symlinks": False}
        if self.same_owner:
            os.chown(path, member.uid, member.gid, **by_name)
        if not member.issym():  # Linux has no symlink modes
            os.chmod(
                path,
                stat.S_IMODE(member.mode),
                **({} if isinstance(path, int) else {"dir_fd": dir_fd}),
            )
        if self.same_owner and isinstance(path, int):
            for key, value in member.pax_headers.items():
                xattr = key.removeprefix("SCHILY.xattr.")
                if xattr != key and (xattr in KEPT_XATTRS or xattr.startswith(KEPT_XATTR_PREFIXES)):
                    os.setxattr(path, xattr, value.encode("utf-8", "surrogateescape"))
        os.utime(path, ns=(int(member.mtime * 1_000_000_000),) * 2, **by_name)

    def _apply_dir_attrs(self, parts: list[str], member: tarfile.TarInfo) -> None:
        try:
            fd = self._open_dir(parts, member.name, create=False)
        except SpecError:
            return  # replaced by a later member (a file, a symlink, a whiteout): nothing to set
        except OSError as exc:
            raise self._os_error("open directory", member.name, exc) from None
        try:
            if fd == self._root_fd:
                fd = os.dup(fd)
            self._apply_attrs(member, fd, None)
        except OSError as exc:
            raise self._os_error("set attributes of", member.name, exc) from None
        finally:
            os.close(fd)


def open_uncompressed(blob: IO[bytes], compression: str) -> IO[bytes]:
    """Wrap ``blob`` so it reads the uncompressed tar. ``compression`` is "gzip" or ""."""
    if compression == "gzip":
        return gzip.GzipFile(fileobj=blob, mode="rb")  # type: ignore[return-value]
    return blob


def sniff_compression(head: bytes, label: str) -> str:
    """Guess a layer's compression from its first bytes (docker-archive gives no media type).

    Raises:
        SpecError: zstd or another format this host cannot read.
    """
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        raise SpecError(f"layer {label}: zstd-compressed layers are not supported")
    return ""


def tree_digest(root: str) -> tuple[str, int]:
    """The diff_id of a directory: sha256 of a canonical tar of it, and its content bytes.

    Used for built layers, so a built layer is named by its content like an imported one.
    The tar is only hashed, never stored.
    """
    sink = _HashSink()
    content_bytes = 0

    def canonical(info: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal content_bytes
        info.uname = info.gname = ""
        if info.isreg():
            content_bytes += info.size
        return info

    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".", recursive=True, filter=canonical)
    return "sha256:" + sink.sha256.hexdigest(), content_bytes


def tree_content_bytes(root: str) -> int:
    """Bytes of regular-file content below ``root``, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class _HashSink:
    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return len(data)
