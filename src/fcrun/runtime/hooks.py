"""OCI hooks: programs the spec's `hooks` names, run at points of a container's life with the
container's state (the OCI state JSON) on stdin.

Where each runs, as in runc:

    prestart, createRuntime   creation.py, in fcrun's (the runtime's) namespaces, once the
                              child's namespaces exist and it is in its cgroup, before it is
                              told to go on ("J"): a failure fails the create, which is undone
    createContainer           the child (child.py), in the container's namespaces before
                              pivot_root (the host's filesystem still reachable): a failure
                              fails the create
    startContainer            the child, after start, in the container (after pivot_root),
                              before the process is exec'd: a failure fails the start
    poststart                 after start, in the runtime's namespaces: a failure is logged
    poststop                  after delete, in the runtime's namespaces: a failure is logged

A hook's `args` is its whole argv (args[0] included, as execv takes it); its `env` is its whole
environment; `timeout` (seconds) kills it when it runs longer.
"""

from __future__ import annotations

import os

import msgspec

from ..errors import ContainerError, SpecError
from ..lazy import Logger
from .spec import OCI_VERSION, Hook, Spec

# The label a front (fcrun-oci) keeps a container's bundle directory in, for the state's
# "bundle"; absent: the directory above the spec's root.
BUNDLE_LABEL = "oci.bundle"
CHILD_HOOK_STAGES = ("create_container", "start_container")

log = Logger(__name__)


class OciState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The state of a container as the runtime-spec defines it (`runc state` prints it too)."""

    oci_version: str = msgspec.field(default=OCI_VERSION, name="ociVersion")
    id: str
    status: str
    pid: int = 0
    bundle: str
    annotations: dict[str, str] = {}


_encoder = msgspec.json.Encoder()


def oci_state(name: str, spec: Spec, status: str, pid: int, labels: dict[str, str]) -> bytes:
    """The OCI state JSON of a container (`status`: creating, created, running or stopped)."""
    bundle = labels.get(BUNDLE_LABEL) or os.path.dirname(os.path.abspath(spec.root.path))
    return _encoder.encode(OciState(id=name, status=status, pid=pid, bundle=bundle, annotations=spec.annotations))


def child_hook_state(name: str, spec: Spec, labels: dict[str, str]) -> bytes:
    """The state JSON for the hooks the child runs, without "status" and "pid": the child
    puts those first (child.run_child_hooks), the pid being its own as the host sees it."""
    state = msgspec.json.decode(oci_state(name, spec, "creating", 0, labels))
    del state["status"]
    state.pop("pid", None)
    return _encoder.encode(state)


def check_hooks(spec: Spec) -> None:
    """Check every hook's path, env and timeout. Raises SpecError naming the hook."""
    if spec.hooks is None:
        return
    for field, wire in zip(spec.hooks.__struct_fields__, spec.hooks.__struct_encode_fields__):
        for i, hook in enumerate(getattr(spec.hooks, field)):
            where = f"$.hooks.{wire}[{i}]"
            if not os.path.isabs(hook.path):
                raise SpecError(f"hook path {hook.path!r} must be absolute", f"{where}.path")
            if hook.timeout is not None and hook.timeout <= 0:
                raise SpecError(f"hook timeout {hook.timeout} must be > 0 seconds", f"{where}.timeout")
            for j, item in enumerate(hook.env):
                if "=" not in item or item.startswith("="):
                    raise SpecError(f"environment entry {item!r} is not KEY=VALUE", f"{where}.env[{j}]")
            if any("\0" in a for a in (hook.path, *hook.args, *hook.env)):
                raise SpecError("a NUL byte in the hook", where)


def hooks_of(spec: Spec, stage: str) -> list[Hook]:
    """The hooks of one stage (a Hooks field name: prestart, create_runtime, ...)."""
    return list(getattr(spec.hooks, stage)) if spec.hooks is not None else []


def run_hook(hook: Hook, state: bytes, stage: str) -> None:
    """Run one hook with `state` on stdin and wait for it.

    Raises:
        ContainerError: it could not be run, exited non-zero or ran past its timeout.
    """
    import subprocess  # only here: `fcrun-oci create` and `delete` load this module, and seldom run a hook

    argv = list(hook.args) or [hook.path]
    env = dict(item.split("=", 1) for item in hook.env)
    try:
        done = subprocess.run(argv, executable=hook.path, input=state, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=hook.timeout, close_fds=True, check=False)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"{stage} hook {hook.path}: still running after its timeout of {hook.timeout}s; killed") from None
    except OSError as exc:
        raise ContainerError(f"{stage} hook {hook.path}: cannot run it: [Errno {exc.errno}] {exc.strerror}") from None
    if done.returncode != 0:
        how = f"exit code {done.returncode}" if done.returncode > 0 else f"killed by signal {-done.returncode}"
        detail = done.stderr.decode(errors="replace").strip()[-500:]
        raise ContainerError(f"{stage} hook {hook.path} failed: {how}" + (f": {detail}" if detail else ""))


def run_hooks(spec: Spec, stages: tuple[str, ...], state: bytes) -> None:
    """Run the hooks of `stages` in order; the first failure stops them and is raised."""
    for stage in stages:
        for hook in hooks_of(spec, stage):
            run_hook(hook, state, stage)


def run_hooks_logged(spec: Spec, stage: str, state: bytes, name: str) -> None:
    """Run a stage whose failures must not stop the container's life (poststart, poststop):
    each failure is logged as a warning and the next hook runs."""
    for hook in hooks_of(spec, stage):
        try:
            run_hook(hook, state, stage)
        except ContainerError as exc:
            log.warning("container %s: %s", name, exc)
