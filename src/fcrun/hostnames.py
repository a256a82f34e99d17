"""Hostnames: the rule for an app's hostnames, and the one reading of a Host header.

Two questions, each answered here only:

- `normalize_hostname`: may an app answer to this name? (The admin API, the CLI and the CMDB
  check every hostname they are given with it.)
- `normalize_host`: which name does a request ask for? (The proxy reads each request's Host
  header with it, the CMDB each host it is asked to look up.) Lowercase, without the port or
  a trailing dot; an IPv6 literal keeps its brackets (``[::1]``), as a URL writes it.

Both give the same string for the same name, so a name stored by the first is found by the
second: ``Example.TEST.`` and ``example.test:8080`` both become ``example.test``.
"""

from __future__ import annotations

import re

from .errors import SpecError

MAX_HOSTNAME_LEN = 253
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# What a Host header may hold: letters, digits, '-', '.', '_' (seen in the wild), or an IPv6
# literal in brackets. Checked with bytes.translate: the proxy reads one per request.
_HOST_CHARS = b"abcdefghijklmnopqrstuvwxyz0123456789-._"
_IPV6_CHARS = b"0123456789abcdef:."


def normalize_hostname(text: str, where: str = "name") -> str:
    """Check an RFC 1123 hostname and return it lowercased, without a trailing dot.

    Raises:
        SpecError: not a hostname (a port, a scheme, an underscore, an empty or long label).
    """
    if not isinstance(text, str) or not text:
        raise SpecError("hostname is empty", where)
    if not text.isascii():  # before lower(): it makes ASCII of some non-ASCII ("\u212a" KELVIN SIGN: "k")
        raise SpecError(f"invalid hostname {text!r}: not ASCII (give an internationalized name in its "
                        "xn-- form)", where)
    host = text.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    if ":" in host or "/" in host:
        raise SpecError(f"invalid hostname {text!r}: give the name alone, without a scheme or port", where)
    if len(host) > MAX_HOSTNAME_LEN:
        raise SpecError(f"invalid hostname {text!r}: longer than {MAX_HOSTNAME_LEN} characters", where)
    for label in host.split("."):
        if not _LABEL.fullmatch(label):
            raise SpecError(
                f"invalid hostname {text!r}: each dot-separated label must be 1-63 letters, digits "
                "or '-', not starting or ending with '-'",
                where,
            )
    return host


def normalize_host(raw: bytes | str) -> str | None:
    """A Host header's value (``host``, ``host:port``, ``[v6]:port``) as the name it asks for:
    lowercase, port and a trailing dot dropped, an IPv6 literal in brackets. None if it is not
    a valid Host value (bad characters, a port that is not a number, an unclosed bracket)."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("ascii")
        except UnicodeEncodeError:
            return None
    host = raw.strip().lower()
    if host[:1] == b"[":
        end = host.find(b"]")
        if end < 0:
            return None
        name, port = host[:end + 1], host[end + 1:]
        if b":" not in name or name[1:-1].translate(None, _IPV6_CHARS):
            return None
        if port and (port[:1] != b":" or not port[1:].isdigit()):
            return None
        return name.decode("ascii")
    name, colon, port = host.partition(b":")
    if colon and not port.isdigit():
        return None
    if name[-1:] == b".":
        name = name[:-1]
    if not name or name.translate(None, _HOST_CHARS):
        return None
    return name.decode("ascii")


__all__ = ["MAX_HOSTNAME_LEN", "normalize_host", "normalize_hostname"]
