"""App instances: the one recipe for every container that serves an app, pooled or not.

Serve's backend (when it runs without a fork-server) and the fork-server (its pool, and the
instances it starts for apps that cannot use the pool) both make instances here, so every
defence reaches every instance. What an instance gets, on top of what every fcrun container
gets (default_spec: runc's capability set, masked paths, no_new_privs, the default seccomp
profile and device allow-list):

- a user namespace with a host id range of its own (userns.py): its root and www-data are
  ids no host user and no other instance has;
- no CAP_NET_RAW (no forged ARP or IP on the bridge) and no CAP_MKNOD;
- a pids limit (DEFAULT_PIDS_MAX unless the app sets one), so a fork bomb stays inside;
- its writable layer in memory (a tmpfs in its own mount namespace, capped at its memory
  limit and charged to its memory cgroup): a disk filler fills its own memory limit, never
  the data root the CMDB lives on; instances are disposable, so nothing is lost;
- the app's docroot only through its slot (Runtime.create(slot=...) + fill_slot): read-only,
  nosuid, nodev, noexec, never a bind mount of a path the host may change under us.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from .constraints import MIN_PIDS_MAX  # an app's own pids limit may not go lower
from .runtime.spec import Capabilities, Seccomp, Spec
from .runtime.options import RunOptions, spec_from_image

DEFAULT_DOCROOT = "/var/www/html"  # where an image without a docroot label serves files from
DEFAULT_PIDS_MAX = 1024  # processes and threads of one instance (Apache prefork: 8-150 workers)
DROPPED_CAPABILITIES = frozenset({"CAP_NET_RAW", "CAP_MKNOD"})


def seccomp_from_setting(setting: str, app: str = "") -> Seccomp | Literal["default", "unconfined"]:
    """An app's stored seccomp setting (cmdb App.seccomp) -> what instance_spec takes.

    Raises:
        SpecError: a stored profile that is not valid (naming the app).
    """
    if setting in ("default", "unconfined"):
        return setting  # type: ignore[return-value]
    from .seccomp import parse_profile

    return parse_profile(setting.encode(), f"the seccomp profile of app {app}" if app else "a seccomp profile")


def docroot_target(image) -> str:
    """Where the app's docroot appears in an instance of `image`."""
    return image.config.docroot or DEFAULT_DOCROOT


def instance_spec(image, *, name: str, cpu: float | None, memory_bytes: int | None,
                  pids_max: int | None = None, env: list[str] | tuple[str, ...] = (),
                  seccomp: Seccomp | Literal["default", "unconfined"] = "default") -> Spec:
    """The spec of an app instance of `image` (see the module docstring for what it adds).

    `seccomp`: the app's profile, as RunOptions.seccomp takes it ("default": the default
    profile; only such an app's instances may come from the pool, whose containers have it).

    Raises:
        SpecError: a bad option (an env entry, a limit), naming it.
    """
    options = RunOptions(cpu=cpu, memory_bytes=memory_bytes, pids_max=pids_max or DEFAULT_PIDS_MAX,
                         env=list(env), network="bridge", volatile_rootfs=True, seccomp=seccomp, userns=True)
    spec = spec_from_image(image, options, name=name)
    caps = spec.process.capabilities
    if caps is not None:
        spec.process.capabilities = Capabilities(**{
            field: [c for c in getattr(caps, field) if c not in DROPPED_CAPABILITIES]
            for field in ("bounding", "effective", "inheritable", "permitted", "ambient")
        })
    return spec


def make_instance(runtime, image, *, name: str, cpu: float | None, memory_bytes: int | None,
                  labels: dict[str, str], pids_max: int | None = None, env: list[str] | tuple[str, ...] = (),
                  docroot: str | None = None, seccomp: Seccomp | Literal["default", "unconfined"] = "default",
                  pooled: bool = False):
    """Create and start an instance of `image` called `name`, with the app's `docroot` (a host
    directory) in its slot; `pooled`: the slot left empty, for a docroot later (fill_slot).
    Without either the instance serves the image's own docroot. Returns the running
    Container (it is not waited for: readiness is the caller's business).

    Raises:
        FcrunError: a bad spec, an unacceptable docroot, or the runtime failed; nothing of
            the instance is left behind.
    """
    spec = instance_spec(image, name=name, cpu=cpu, memory_bytes=memory_bytes, pids_max=pids_max, env=env,
                         seccomp=seccomp)
    slot = docroot_target(image) if docroot or pooled else None
    # One step (create + fill the slot + start): one state save, no stop at "created".
    return runtime.run(name, spec, image=image, detach=True, labels=labels, slot=slot, slot_source=docroot or None)


__all__ = ["DEFAULT_DOCROOT", "DEFAULT_PIDS_MAX", "MIN_PIDS_MAX", "docroot_target", "instance_spec", "make_instance",
           "seccomp_from_setting"]
