"""Which CMDB a URL names, and the URL as messages may show it (password masked).

``postgresql://USER:PASSWORD@HOST:PORT/DB`` (or ``postgres://``, or libpq's
``?host=/socket/dir`` for a unix socket) is the PostgreSQL CMDB that several hosts share;
``sqlite:///ABSOLUTE/PATH`` an SQLite file; no URL at all the default, ``<data
root>/cmdb.sqlite3``. Nothing here imports a database driver: `fcrun app` against SQLite does
not pay for psycopg.
"""

from __future__ import annotations

import os
import re

from ..errors import SpecError

POSTGRES_SCHEMES = ("postgresql", "postgres")
SQLITE_SCHEME = "sqlite"

_USERINFO_PASSWORD = re.compile(r"(://[^/?#@:]*:)[^/?#@]*@")
_QUERY_PASSWORD = re.compile(r"(?i)(password=)[^&\s]*")


def mask_url(url: str) -> str:
    """`url` with any password (``user:secret@`` or ``password=secret``) shown as ``***``."""
    return _QUERY_PASSWORD.sub(r"\g<1>***", _USERINFO_PASSWORD.sub(r"\g<1>***@", url))


def url_scheme(url: str, where: str = "cmdb.url") -> str:
    """"postgresql" or "sqlite" for a CMDB URL.

    Raises:
        SpecError: no scheme, or one fcrun has no CMDB for (the URL named, password masked).
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in POSTGRES_SCHEMES:
        return "postgresql"
    if sep and scheme == SQLITE_SCHEME:
        return "sqlite"
    raise SpecError(f"CMDB URL {mask_url(url)!r} is not one fcrun knows: use postgresql://USER@HOST/DB "
                    "or sqlite:///ABSOLUTE/PATH", where)


def sqlite_path(url: str, where: str = "cmdb.url") -> str:
    """The file of a ``sqlite:///ABSOLUTE/PATH`` URL.

    Raises:
        SpecError: the path is not absolute.
    """
    path = url.partition("://")[2]
    if not os.path.isabs(path):
        raise SpecError(f"CMDB URL {url!r}: the file must be an absolute path (sqlite:///var/lib/x.sqlite3)", where)
    return path
