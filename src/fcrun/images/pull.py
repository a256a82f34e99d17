"""Pulling images from OCI/Docker registries into the store, through skopeo.

skopeo (Debian's package) speaks the registry protocols: TLS, token auth with its auth file,
manifest lists, schema conversions, digest checks of every blob. fcrun asks it for two things
and does the rest itself::

    skopeo inspect --raw docker://REF          the manifest or index REF names now: its sha256
                                               is the resolved digest (and checks a pinned one)
    skopeo copy docker://HOST/REPO@DIGEST      the host's platform from an index, into an OCI
                oci:<tmp>/layout:pulled        layout in a temporary directory
    ImageStore.import_(<tmp>/layout)           verified, extracted, committed atomically

Copying by the resolved digest, not by the tag, means a tag moved between the two calls cannot
change what is stored. The download goes to ``<data root>/.pull-tmp/pull-*`` (the store's
filesystem, where the space is) and is removed whatever happens; the store's import commits
the layers and then the record, so a failed pull leaves neither. A pull killed outright leaves
its directory, which the next pull removes (its flock is free then).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import AlreadyExists, FcrunError, KernelError, MissingFeature, NotFound, SpecError
from .image import Image, parse_name
from .limits import ImportLimits
from .recipes import Progress
from .reference import Reference, is_registry_reference, parse_reference
from .store import ImageStore

SKOPEO = "skopeo"
PULL_TMP = ".pull-tmp"
OCI_TAG = "pulled"  # the tag inside the temporary layout; the store names the image itself
DEFAULT_TIMEOUT_S = 600.0
REGISTRIES_CONF_ENV = "CONTAINERS_REGISTRIES_CONF"
# skopeo's own --command-timeout ends it cleanly with its reason; this is only the backstop.
_KILL_GRACE_S = 30.0


class RegistryError(FcrunError):
    """The registry refused or could not be reached; the message names it and skopeo's reason."""

    exit_code = 1
    http_status = 502


class DigestMismatch(RegistryError):
    """A pinned digest is not what the registry has for the reference."""


@dataclass(frozen=True)
class PullOptions:
    """How to reach the registry (each maps to a skopeo option)."""

    platform: str | None = None  # "linux/arm64[/v8]"; None: this host's (skopeo's default)
    # False: plain HTTP or unverified TLS (a local registry); None: verify unless
    # registries.conf marks the registry insecure (an explicit True would override that)
    tls_verify: bool | None = None
    authfile: str | None = None  # None: skopeo's default (`skopeo login` writes it)
    timeout_s: float = DEFAULT_TIMEOUT_S  # for each skopeo call
    progress: bool = False  # skopeo's per-blob lines and the store's steps on stderr
    # containers-registries.conf(5) to read instead of /etc/containers/registries.conf: where
    # `insecure = true` marks a registry plain-HTTP for every pull (`fcrun app add` has no
    # --tls-verify). skopeo 1.9 ignores $CONTAINERS_REGISTRIES_CONF, so fcrun passes it on.
    registries_conf: str | None = None

    @classmethod
    def from_env(cls, **settings: object) -> "PullOptions":
        """Options with ``registries_conf`` from $CONTAINERS_REGISTRIES_CONF (podman's too)."""
        return cls(registries_conf=os.environ.get(REGISTRIES_CONF_ENV) or None, **settings)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Completed:
    """What one skopeo call did (the runner's result)."""

    returncode: int
    stdout: bytes
    stderr: str


# Runs skopeo's argv; ``stdout_to_stderr``: let its progress through to our stderr. None is
# ``run_skopeo``; tests pass another, e.g. one recording the argv.
Runner = Callable[[list[str], float, bool], Completed]


def run_skopeo(argv: list[str], timeout_s: float, stdout_to_stderr: bool) -> Completed:
    """The real runner.

    Raises:
        MissingFeature: no skopeo on PATH.
    """
    stdout: int = subprocess.PIPE
    if stdout_to_stderr:
        with contextlib.suppress(AttributeError, io.UnsupportedOperation):  # a captured stderr
            stdout = sys.stderr.fileno()
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                              timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise MissingFeature("skopeo", "image pulls go through it: apt-get install skopeo") from None
    except subprocess.TimeoutExpired:  # run() has killed and reaped it
        return Completed(124, b"", f"skopeo did not finish within {timeout_s:.0f} s and was killed")
    return Completed(done.returncode, done.stdout or b"", done.stderr.decode(errors="replace"))


def pull(
    store: ImageStore,
    text: str,
    name: str | None = None,
    options: PullOptions = PullOptions(),
    progress: Progress | None = None,
    limits: ImportLimits | None = None,
    runner: Runner | None = None,
) -> Image:
    """Pull the image ``text`` names (a registry reference) into ``store`` as ``name``.

    ``name`` defaults to ``Reference.local_name()`` (``app:1.2``). The record's ``source`` is
    ``docker://<reference>@<resolved digest>`` and ``repo_digest`` ``HOST/REPO@<digest>``;
    an image of that name is replaced, as an import replaces it.

    Raises:
        SpecError: a bad reference, name or platform.
        DigestMismatch: a pinned digest is not what the registry has.
        RegistryError: the registry is unreachable or refused (naming it and skopeo's reason).
        MissingFeature: skopeo is not installed.
        Whatever ``ImageStore.import_`` raises for a bad image. In every case the store is
        unchanged and the download directory removed.
    """
    ref = parse_reference(text)
    wanted = parse_name(name) if name is not None else ref.local_name()
    runner = runner or run_skopeo
    say = progress or (lambda _line: None)
    digest = resolve_digest(ref, options, runner)
    say(f"{wanted}: pulling {ref.by_digest(digest)}")
    with download_dir(store.paths.data_root) as work:
        layout = os.path.join(work, "layout")
        argv = copy_argv(ref.by_digest(digest), f"oci:{layout}:{OCI_TAG}", options)
        _check(runner(argv, options.timeout_s + _KILL_GRACE_S, options.progress), ref)
        return store.import_(
            layout,
            wanted,
            progress=progress,
            limits=limits,
            source=f"docker://{ref.resolved(digest)}",
            repo_digest=ref.by_digest(digest),
        )


def ensure_image(
    store: ImageStore,
    text: str,
    options: PullOptions = PullOptions(),
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> str:
    """The local image name for ``text``, pulling it first if it is a registry reference whose
    image is not in the store yet (``fcrun app add --image REF``: pull on first use).

    A local name is returned as it is. A reference whose image is stored already is not
    pulled again, unless it pins a digest the stored image was not pulled at.

    Raises:
        AlreadyExists: an image of the name REF gives is stored from elsewhere (a recipe's
        ``busybox`` for ``docker.io/library/busybox``): neither replaced nor used in its place.
        What ``pull`` raises.
    """
    if not is_registry_reference(text):
        return text
    ref = parse_reference(text, "--image")
    wanted = ref.local_name()
    try:
        stored = store.get(wanted)
    except NotFound:
        stored = None
    if stored is not None:
        repository = f"{ref.registry}/{ref.repository}"
        if not stored.repo_digest.startswith(repository + "@"):
            raise AlreadyExists(
                f"image {wanted!r} in the store is not from {repository} (its source: {stored.source}): "
                f"pull it under another name (`fcrun image pull {text} NAME`) and give --image NAME"
            )
        if ref.digest is None or stored.repo_digest == ref.by_digest(ref.digest):
            return wanted
    return pull(store, text, wanted, options, progress, runner=runner).name


def resolve_digest(ref: Reference, options: PullOptions, runner: Runner | None = None) -> str:
    """The sha256 of the manifest or index ``ref`` names at the registry now.

    A pinned digest is checked here: with a tag, the tag must point at it (else both are
    named); alone, the registry must have it (skopeo fetches by digest and so do we).

    Raises:
        DigestMismatch, RegistryError, MissingFeature.
    """
    runner = runner or run_skopeo  # looked up now, so tests may replace it
    target = ref.by_tag() if ref.tag is not None else ref.by_digest(str(ref.digest))
    argv = [SKOPEO, *_global_options(options), "inspect", "--raw", *_tls_auth("", options), f"docker://{target}"]
    done = _check(runner(argv, options.timeout_s + _KILL_GRACE_S, False), ref)
    digest = "sha256:" + hashlib.sha256(done.stdout).hexdigest()
    if ref.digest is not None and digest != ref.digest:
        if ref.tag is not None:
            raise DigestMismatch(
                f"pull {ref}: refused: tag {ref.tag!r} of {ref.registry}/{ref.repository} points at "
                f"{digest}, not at the pinned {ref.digest}"
            )
        raise DigestMismatch(  # skopeo checks this too: a registry answering the wrong content
            f"pull {ref}: refused: the registry {ref.registry} answered a manifest hashing to {digest} "
            f"for the pinned {ref.digest}"
        )
    return digest


def copy_argv(source: str, destination: str, options: PullOptions) -> list[str]:
    """skopeo's argv to copy ``docker://source`` (one platform's image) to ``destination``."""
    argv = [SKOPEO, *_global_options(options), *platform_options(options.platform), "copy"]
    if not options.progress:
        argv.append("--quiet")
    return argv + [*_tls_auth("src-", options), f"docker://{source}", destination]


def platform_options(platform: str | None) -> list[str]:
    """``linux/arm64/v8`` -> skopeo's --override-os/-arch/-variant (none: this host's).

    Raises:
        SpecError: not OS/ARCH[/VARIANT].
    """
    if platform is None:
        return []
    parts = platform.split("/")
    if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"[a-z0-9_]+", p) for p in parts):
        raise SpecError(f"invalid platform {platform!r}: use OS/ARCH[/VARIANT], e.g. linux/arm64", "--platform")
    argv = ["--override-os", parts[0], "--override-arch", parts[1]]
    if len(parts) == 3:
        argv += ["--override-variant", parts[2]]
    return argv


_FATAL = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')
# skopeo prefixes its reason with what it was doing and the whole reference: we say that.
_CONTEXT = re.compile(r'^(?:Error parsing image name "[^"]*"|initializing source \S+|'
                      r"choosing an image from manifest list \S+|Error reading manifest \S+ in \S+): ")


def skopeo_reason(stderr: str) -> str:
    """The reason in skopeo's stderr: its fatal message, unquoted, without the prefix that
    repeats the reference; else its last line."""
    found = _FATAL.findall(stderr)
    if not found:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        return lines[-1] if lines else "no message"
    message = re.sub(r"\\(.)", r"\1", found[-1])
    return _CONTEXT.sub("", message)


@contextlib.contextmanager
def download_dir(data_root: str) -> Iterator[str]:
    """A new directory under ``<data_root>/.pull-tmp`` for one pull; removed on exit.

    Resource handling: ``pull-X.lock`` is flock()ed while ``pull-X`` is in use; its flock dies
    with the process, so a directory whose lock can be taken is abandoned and removed here.
    """
    parent = os.path.join(data_root, PULL_TMP)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise KernelError.from_oserror("create directory", parent, exc) from None
    _remove_abandoned(parent)
    work, lock_fd = _locked_name(parent)
    try:
        os.mkdir(work, 0o700)
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        os.unlink(work + ".lock")
        os.close(lock_fd)


def _locked_name(parent: str) -> tuple[str, int]:
    """A new ``pull-X`` name whose ``pull-X.lock`` this process holds flock()ed.

    The lock exists before the directory and goes after it, so a directory is never unlocked
    while its pull lives. A cleaner may take the new lock file between its creation and our
    flock and unlink it: then the file we locked is no longer the one at that path, and we try
    another name.
    """
    while True:
        work = os.path.join(parent, f"pull-{uuid.uuid4().hex[:12]}")
        try:
            fd = os.open(work + ".lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise KernelError.from_oserror("create lock file", work + ".lock", exc) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(work + ".lock").st_ino == os.fstat(fd).st_ino:
                return work, fd
        os.close(fd)


def _remove_abandoned(parent: str) -> None:
    for entry in sorted(os.listdir(parent)):
        if not entry.endswith(".lock"):
            if not os.path.exists(os.path.join(parent, entry + ".lock")):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)  # its lock went first
            continue
        path = os.path.join(parent, entry)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # its pull just finished
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a pull in progress
        else:
            shutil.rmtree(path.removesuffix(".lock"), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            os.close(fd)


def _global_options(options: PullOptions) -> list[str]:
    argv = ["--command-timeout", f"{max(1, round(options.timeout_s))}s"]
    if options.registries_conf is not None:
        argv += ["--registries-conf", options.registries_conf]
    return argv


def _tls_auth(prefix: str, options: PullOptions) -> list[str]:
    """``--tls-verify`` / ``--authfile`` for inspect, ``--src-...`` for copy."""
    argv = []
    if options.tls_verify is not None:
        argv.append(f"--{prefix}tls-verify={'true' if options.tls_verify else 'false'}")
    if options.authfile is not None:
        argv += [f"--{prefix}authfile", options.authfile]
    return argv


def _check(done: Completed, ref: Reference) -> Completed:
    """``done`` if skopeo succeeded, else a RegistryError naming the registry and its reason."""
    if done.returncode != 0:
        hint = ""
        reason = skopeo_reason(done.stderr)
        if "server gave HTTP response to HTTPS client" in reason:
            hint = " (a plain-HTTP registry: give --tls-verify=false)"
        raise RegistryError(f"pull {ref}: registry {ref.registry}: {reason}{hint}")
    return done
