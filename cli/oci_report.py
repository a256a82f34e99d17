"""What `fcrun-oci` prints: OCI state JSON, runc's list table, features, stats, a default spec.

Pure functions of library values, so unit tests check them without root.
"""

from __future__ import annotations

# The label where create records the bundle: fcrun.runtime.hooks.BUNDLE_LABEL, which the hooks'
# state reads too (a unit test checks they are equal; importing hooks here cost `state` ~10 ms).
BUNDLE_LABEL = "oci.bundle"

# fcrun's statuses as the OCI runtime spec names them ("frozen" is runc's "paused").
OCI_STATUS = {"creating": "creating", "created": "created", "running": "running", "frozen": "paused",
              "stopped": "stopped"}
LIST_COLUMNS = ("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")


def rfc3339(timestamp: float) -> str:
    """runc's time format (Go's RFC3339Nano, UTC), from seconds since the epoch."""
    import datetime

    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}000Z"


def state_json(name: str, status: str, pid: int, created_at: float, labels: dict[str, str], spec) -> dict:
    """The OCI state of a container (runtime-spec runtime.md "State"), with runc's extra
    fields (rootfs, created, owner). A stopped container has no pid: 0, as runc says."""
    return {
        "ociVersion": spec.oci_version,
        "id": name,
        "pid": pid if status in ("created", "running", "frozen") else 0,
        "status": OCI_STATUS.get(status, status),
        "bundle": labels.get(BUNDLE_LABEL, ""),
        "rootfs": spec.root.path,
        "created": rfc3339(created_at),
        "owner": "",
        "annotations": dict(spec.annotations),
    }


def list_table(states: list[dict]) -> str:
    """runc's `list` table (Go's tabwriter: columns padded to the widest cell + 1, min 12)."""
    rows = [LIST_COLUMNS]
    for s in states:
        rows.append((s["id"], str(s["pid"]), s["status"], s["bundle"], s["created"], s["owner"] or "root"))
    widths = [max(12, max(len(r[i]) for r in rows) + 1) for i in range(len(LIST_COLUMNS))]
    lines = ["".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + r[-1] for r in rows]
    return "\n".join(lines) + "\n"


def ps_table(ps_output: str, pids: set[int]) -> str:
    """The header and the lines of `ps` output whose PID column is one of `pids` (runc ps)."""
    lines = ps_output.splitlines()
    if not lines:
        return ""
    header = lines[0].split()
    if "PID" not in header:
        raise ValueError("ps output has no PID column")
    column = header.index("PID")
    kept = [lines[0]]
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in pids:
            kept.append(line)
    return "\n".join(kept) + "\n"


def stats_event(name: str, stats, memory_limit: int | None, pids_limit: int | None) -> dict:
    """`runc events --stats`: one "stats" event with runc's field names (cgroups.Stats)."""
    return {
        "type": "stats",
        "id": name,
        "data": {
            "cpu": {
                "usage": {"total": stats.cpu_usage_us * 1000},
                "throttling": {"periods": stats.nr_periods, "throttledPeriods": stats.nr_throttled,
                               "throttledTime": stats.throttled_us * 1000},
            },
            "memory": {"usage": {"usage": stats.memory_bytes, "limit": memory_limit or 0}},
            "pids": {"current": stats.pids_current, "limit": pids_limit or 0},
        },
    }


def features(oci_version: str, namespaces, capabilities, mount_types, hooks, seccomp_actions) -> dict:
    """runtime-spec features.md: what this runtime supports, as `runc features` prints it."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": oci_version,
        "hooks": list(hooks),
        "mountOptions": sorted(MOUNT_OPTIONS),
        "linux": {
            "namespaces": sorted(namespaces),
            "capabilities": list(capabilities),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": True, "actions": list(seccomp_actions)},
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "mountTypes": sorted(mount_types),
        },
        "annotations": {"org.fcrun.oci.runtime": "fcrun-oci"},
    }


# The mount options fcrun's plan turns into mount flags or propagation (runtime/plan.py);
# any other option is passed on to the filesystem as data (mode=, size=, gid=).
MOUNT_OPTIONS = {
    "bind", "dev", "exec", "noatime", "nodev", "noexec", "nosuid", "private", "rbind", "relatime", "ro",
    "rprivate", "rshared", "rslave", "rw", "shared", "slave", "strictatime", "suid",
}


def pretty(value) -> str:
    import json

    return json.dumps(value, indent=2)
