"""The commented example configuration (packaging/fcrun.toml.example), made from ServeConfig.

Generated rather than written by hand so it cannot drift from the Structs: every key appears
with its default, commented out, so the file as shipped changes nothing and an operator
uncomments what they change. tests/unit/test_serve_config_example.py checks that the shipped
file is this output and that, uncommented, it decodes to the defaults.

    python -m fcrun.serve.config_example > packaging/fcrun.toml.example
"""

from __future__ import annotations

import json

import msgspec

from .config import DEFAULT_CONFIG_PATH, ServeConfig
from .reload import is_live

HEADER = f"""\
# fcrun serve's configuration: {DEFAULT_CONFIG_PATH} is read when present; --config FILE or
# FCRUN_CONFIG=FILE name another. Every key below shows its default, commented out: uncomment
# what you change. Unknown keys are errors naming the file and key.
#
# SIGHUP (systemctl reload fcrun) applies the keys marked [live]; the others are reported in
# the log and as a `reload` event and take effect at the next restart.
# Keys marked (unset) have no default value: set one to enable what they describe.
"""
UNSET = "(unset)"
# What an empty default means, where it is not obvious.
NOTES = {
    "admin_socket": '"": <run_root>/admin.sock',
    "runtime.data_root": '"": FCRUN_ROOT, else /var/lib/fcrun',
    "runtime.run_root": '"": FCRUN_RUN, else /run/fcrun',
    "cmdb.url": "unset: <data_root>/cmdb.sqlite3; or postgresql://USER:PASSWORD@HOST/DB",
    "cmdb.events_keep_days": "older events are removed, hourly; 0: kept for ever",
    "proxy.max_body_bytes": "0: unlimited",
    "cluster.role": "all | node | front (node, front: a postgresql:// cmdb.url)",
    "cluster.node_name": '"": <hostname>:<run_root>; a front: <hostname>:front:<listen>',
    "cluster.advertise": '"": listen (a node must name an address fronts can reach)',
    "cluster.cpu_capacity": "unset: every CPU of the machine",
    "cluster.memory_capacity_bytes": "unset: the machine's MemTotal",
}


def render(config: ServeConfig | None = None) -> str:
    """The example text for `config` (default: the built-in defaults)."""
    config = config or ServeConfig()
    lines = [HEADER]
    tables = []
    for name in config.__struct_fields__:
        value = getattr(config, name)
        if isinstance(value, msgspec.Struct):
            tables.append((name, value))
        else:
            lines.append(_line(name, name, value))
    for table, struct in tables:
        doc = (type(struct).__doc__ or "").strip().splitlines()
        lines.append("")
        if doc:
            lines.append(f"# {doc[0]}")
        lines.append(f"[{table}]")
        for name in struct.__struct_fields__:
            lines.append(_line(name, f"{table}.{name}", getattr(struct, name)))
    return "\n".join(lines) + "\n"


def _line(name: str, key: str, value: object) -> str:
    notes = (["[live]"] if is_live(key) else []) + ([NOTES[key]] if key in NOTES else [])
    mark = f"  # {'; '.join(notes)}" if notes else ""
    if value is None:
        return f"# {name} = {UNSET}{mark}"
    return f"# {name} = {_toml_value(value)}{mark}"


def _toml_value(value: object) -> str:
    """TOML for the value types the config uses (str, bool, number, list of str, table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string for these values
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def uncommented(text: str) -> str:
    """The example with every set key uncommented (unset ones dropped): what a test decodes."""
    out = []
    for line in text.splitlines():
        if line.startswith("# ") and " = " in line and not line.startswith("# #"):
            body = line[2:].split("  # ")[0]
            if body.endswith(f"= {UNSET}") or " " in body.split(" = ")[0]:
                continue
            out.append(body)
        elif line.startswith("["):
            out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
