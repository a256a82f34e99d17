"""Reading tar headers from hostile archives: bounded memory, linear time, no sparse files.

``tarfile`` reads members for us, but some of its header handling trusts the archive:

- a pax extended header or GNU long name is read into memory whole, whatever size its header
  claims (a 4 GiB "name" is a 4 GiB allocation); here such headers are capped at
  ``MAX_HEADER_BYTES`` (Go's archive/tar caps them at 1 MiB too);
- Python 3.11's pax parser searches the header with a regex that backtracks quadratically on
  runs of digits (CVE-2024-6232: a 64 KiB header costs seconds, 1 MiB hours); here pax
  records are split in one pass, as CPython 3.12.6 and later do;
- GNU sparse files (old GNU type 'S', pax GNU.sparse.* 0.0, 0.1 and 1.0) expand to any size
  from a small archive, their maps are parsed with bare ``int()`` (ValueError escapes), and
  the 1.0 map reader loops forever on a truncated stream. No OCI tool writes sparse members
  (Go's archive/tar, used by docker, buildkit and containers/image, writes none), so they
  are refused.

``TarRefused`` is not a ``tarfile.HeaderError`` on purpose: tarfile takes an invalid header
after the first as the end of the archive, which would silently drop the rest of a layer.
"""

from __future__ import annotations

import re
import tarfile
from typing import IO

MAX_HEADER_BYTES = 1 << 20
SPARSE_KEY_PREFIX = "GNU.sparse."
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG_NAME_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")


class TarRefused(Exception):
    """A header this reader will not process; the message says why."""


class CheckedTarInfo(tarfile.TarInfo):
    """A TarInfo whose header processing is bounded (see the module docstring).

    ``_proc_member`` and ``_proc_pax`` are the hooks tarfile documents for subclasses
    ("_proc_member() ... can be overridden in a subclass to add custom _proc_*() methods").
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise TarRefused(f"{self.name!r} is a GNU sparse file; sparse files are not supported")
        if self.type in _PAX_TYPES + _LONG_NAME_TYPES and not 0 <= self.size <= MAX_HEADER_BYTES:
            raise TarRefused(
                f"extended header of {self.size} bytes (before {self.name!r}) is over the "
                f"{MAX_HEADER_BYTES}-byte limit"
            )
        if self.size < 0:
            raise TarRefused(f"{self.name!r} has a negative size {self.size}")
        return super()._proc_member(tarfile_)

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        buf = tarfile_.fileobj.read(self._block(self.size))  # type: ignore[attr-defined]
        records = parse_pax_records(buf[: self.size])
        pax_headers = tarfile_.pax_headers if self.type == tarfile.XGLTYPE else tarfile_.pax_headers.copy()
        charset = next((v for k, v in records if k == b"hdrcharset"), None)
        name_encoding = tarfile_.encoding if charset == b"BINARY" else "utf-8"
        for raw_key, raw_value in records:
            key = self._decode_pax_field(raw_key, "utf-8", "utf-8", tarfile_.errors)  # type: ignore[attr-defined]
            if key.startswith(SPARSE_KEY_PREFIX):
                raise TarRefused(f"pax header {key}: sparse files are not supported")
            encoding = name_encoding if key in tarfile.PAX_NAME_FIELDS else "utf-8"
            pax_headers[key] = self._decode_pax_field(  # type: ignore[attr-defined]
                raw_value, encoding, tarfile_.encoding, tarfile_.errors
            )
            if key in tarfile.PAX_NUMBER_FIELDS:
                _check_number(key, pax_headers[key])

        try:
            following: CheckedTarInfo = self.fromtarfile(tarfile_)  # type: ignore[assignment]
        except tarfile.HeaderError as exc:
            raise TarRefused(f"header after a pax header: {exc}") from None
        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            following.apply_pax(pax_headers, tarfile_)
            following.offset = self.offset
            if "size" in pax_headers:
                # The pax size replaces the header's: the next header starts after that many.
                if following.size < 0:
                    raise TarRefused(f"{following.name!r} has a negative size {following.size}")
                offset = following.offset_data
                if following.isreg() or following.type not in tarfile.SUPPORTED_TYPES:
                    offset += following.padded_size()
                tarfile_.offset = offset  # type: ignore[attr-defined]
        return following

    def apply_pax(self, pax_headers: dict[str, str], tarfile_: tarfile.TarFile) -> None:
        self._apply_pax_info(pax_headers, tarfile_.encoding, tarfile_.errors)  # type: ignore[attr-defined]

    def padded_size(self) -> int:
        """The data's size in the archive: whole 512-byte blocks."""
        return self._block(self.size)  # type: ignore[attr-defined]


def parse_pax_records(buf: bytes) -> list[tuple[bytes, bytes]]:
    """Split pax records ``"%d %s=%s\\n"`` (length, keyword, value) in one pass.

    Raises:
        TarRefused: a record's framing is wrong.
    """
    records = []
    pos = 0
    while pos < len(buf) and buf[pos] != 0:
        match = _PAX_LENGTH.match(buf, pos)
        if not match:
            raise TarRefused(f"malformed pax record at byte {pos}")
        length = int(match.group(1))
        end = pos + length - 1  # the record's closing newline
        if length < 5 or end >= len(buf) or buf[end] != 0x0A:
            raise TarRefused(f"malformed pax record at byte {pos} (length {length})")
        key, equals, value = buf[match.end() : end].partition(b"=")
        if not key or not equals:
            raise TarRefused(f"malformed pax record at byte {pos} (no keyword=value)")
        records.append((key, value))
        pos += length
    return records


def _check_number(key: str, value: str) -> None:
    """tarfile turns a non-number into 0 silently; a size of 0 would misplace the next header."""
    try:
        float(value) if key in ("mtime", "atime", "ctime") else int(value)
    except ValueError:
        raise TarRefused(f"pax header {key}={value[:40]!r} is not a number") from None


def open_stream(stream: IO[bytes]) -> tarfile.TarFile:
    """A tarfile reading ``stream`` front to back (no seeking) with checked headers."""
    return tarfile.open(fileobj=stream, mode="r|", tarinfo=CheckedTarInfo)


def open_archive(path: str) -> tarfile.TarFile:
    """A tarfile reading the (plain or compressed) archive at ``path`` with checked headers."""
    return tarfile.open(path, "r:*", tarinfo=CheckedTarInfo)
