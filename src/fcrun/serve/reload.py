"""What a SIGHUP can change in a running serve, and what needs a restart.

Pure functions of two ServeConfigs (the file as serve last applied it, the file now), so the
rules are tested without a serve. A key is live only when serve has somewhere to put the new
value that every later use reads (checked in server.py `Serve.apply_live`); everything else,
including keys added later and not listed here, needs a restart, which is the safe answer.

Live (why each can change):
- hold_timeout_s, drain_timeout_s: the manager reads its attributes on each cold start / drain.
- proxy.* (but access_log): the proxy reads its config on each connection, request and sweep;
  a new connection gets the new forwarding headers, existing ones keep theirs.
- defaults.*: the admin controller reads them on each `fcrun app add`.
- forkserver.pool_size, forkserver.pool_sizes: the supervisor resizes its pools.

Restart: listen and every admin_*/metrics_* key (sockets and TLS made at start), paths and
runtime.* (bridge, subnet, cgroup parent: instances already use them), docroot_roots (the
fork-server checks each mount against the roots it was started with), forkserver.enabled and
its pool_cpu/memory/max_age (the fork-server's arguments), cmdb.url, metrics_interval_s.
"""

from __future__ import annotations

import msgspec

LIVE_KEYS = ("hold_timeout_s", "drain_timeout_s", "proxy", "defaults",
             "forkserver.pool_size", "forkserver.pool_sizes")
# Keys under a live table that serve reads only at start.
RESTART_KEYS: tuple[str, ...] = ()  # (proxy.access_log is live: Serve.apply_live sets the manager's hook)


def flatten(config: msgspec.Struct, prefix: str = "") -> dict[str, object]:
    """{"proxy.max_body_bytes": 10485760, ...}: every leaf of nested Structs by dotted key."""
    leaves: dict[str, object] = {}
    for name in config.__struct_fields__:
        value = getattr(config, name)
        key = f"{prefix}{name}"
        if isinstance(value, msgspec.Struct):
            leaves.update(flatten(value, key + "."))
        else:
            leaves[key] = value
    return leaves


def changed_keys(old: msgspec.Struct, new: msgspec.Struct) -> list[str]:
    """The dotted keys whose values differ, sorted."""
    before, after = flatten(old), flatten(new)
    return sorted(key for key in after if before.get(key) != after[key])


def is_live(key: str) -> bool:
    if key in RESTART_KEYS:
        return False
    return any(key == live or key.startswith(live + ".") for live in LIVE_KEYS)


def classify(keys: list[str]) -> tuple[list[str], list[str]]:
    """(live, needs restart) among `keys`, order kept."""
    return [k for k in keys if is_live(k)], [k for k in keys if not is_live(k)]


def with_live(current: msgspec.Struct, fresh: msgspec.Struct, keys: list[str]) -> msgspec.Struct:
    """`current` with the live `keys` taken from `fresh` (restart keys keep their values)."""
    result = current
    for key in keys:
        if is_live(key):
            result = _replace(result, fresh, key.split("."))
    return result


def _replace(current: msgspec.Struct, fresh: msgspec.Struct, parts: list[str]) -> msgspec.Struct:
    head, rest = parts[0], parts[1:]
    value = getattr(fresh, head) if not rest else _replace(getattr(current, head), getattr(fresh, head), rest)
    return msgspec.structs.replace(current, **{head: value})
