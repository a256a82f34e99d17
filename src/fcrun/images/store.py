"""The image store: named image records over content-addressed, read-only layers.

On disk, under the data root::

    images/<name>.json       one record per image (msgspec JSON), replaced atomically
    layers/<hex>/            one directory per layer, named by its diff_id, in overlayfs format
    .image-tmp/              builds and extractions in progress (same filesystem: rename commits)
    images.lock              flock()ed by every operation that writes

A build or import does all its work in ``.image-tmp``, then renames finished layers into
``layers/`` and only then writes the record. So a failure at any point leaves no record and no
half-written layer; a crash can at worst leave an unreferenced complete layer (``prune``) or
debris in ``.image-tmp``, which the next writer clears. Readers take no lock: a record is
either the old file or the new one.

An import is capped (limits.py: layer size, image size, file count), counted while the layers
stream; a refusal, like a full disk, leaves nothing behind either.

Layers are never written after they are renamed into place: containers use them as overlayfs
lower dirs. A rebuild or re-import makes new layers and leaves the old ones for containers that
still run on them; ``prune`` removes layers no record and no container refers to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from typing import Callable, Iterable, Iterator

import msgspec

from .. import syscalls as sc
from ..atomicfile import write_atomic
from ..errors import FcrunError, IncorrectStatus, KernelError, SpecError
from ..mountinfo import read_mountpoints
from ..paths import Paths
from ..units import format_bytes
from . import oci, oci_source
from .catalog import RECORD_SUFFIX, get_image, layer_dir, load_record, record_path
from .image import Image, ImageConfig, parse_name
from .limits import ImportBudget, ImportLimits
from .layer import (
    HashingReader,
    LayerExtractor,
    OverlayMarks,
    open_uncompressed,
    sniff_compression,
    tree_content_bytes,
    tree_digest,
)
from .recipes import (
    BuildFailed,
    Progress,
    check_rootfs,
    default_recipes_dir,
    find_recipe,
    load_config,
    recipe_hash,
    run_build,
)

TMP_DIR = ".image-tmp"
LOCK_FILE = "images.lock"


def _quiet(_line: str) -> None:
    pass


class ImageStore:
    """Images of one fcrun installation (``paths.images``, ``paths.layers``).

    ``recipes_dir`` holds the build recipes (default: ``$FCRUN_RECIPES`` or the source tree's
    ``rootfs/``). ``marks`` writes overlay whiteouts; tests may pass a recording one.
    """

    def __init__(
        self, paths: Paths, recipes_dir: str | None = None, marks: OverlayMarks | None = None
    ):
        self.paths = paths
        self.recipes_dir = recipes_dir or default_recipes_dir()
        self._marks = marks
        self._tmp = os.path.join(paths.data_root, TMP_DIR)
        self._lock_path = os.path.join(paths.data_root, LOCK_FILE)

    # -- reading (no lock) ----------------------------------------------------------------

    def get(self, name: str) -> Image:
        """The image called ``name`` (catalog.get_image).

        Raises:
            SpecError: ``name`` is not a valid image name.
            NotFound: no such image (the message says how to build it when a recipe exists),
            or one of its layers is gone.
        """
        return get_image(self.paths, name, self.recipes_dir)

    def list(self) -> list[Image]:
        """All images, by name."""
        try:
            files = sorted(os.listdir(self.paths.images))
        except FileNotFoundError:
            return []
        return [
            self._load(os.path.join(self.paths.images, f))
            for f in files
            if f.endswith(RECORD_SUFFIX) and not f.startswith(".")
        ]

    def layer_dir(self, diff_id: str) -> str:
        return layer_dir(self.paths, diff_id)

    # -- building -------------------------------------------------------------------------

    def build(self, recipe: str, rebuild: bool = False, progress: Progress | None = None) -> Image:
        """Build the image ``recipe`` from ``<recipes_dir>/<recipe>/``; a no-op if it is current.

        Current means: an image of that name exists, was built from a recipe with the same
        hash, and its layers are present. ``rebuild`` builds anyway.

        Raises:
            NotFound: no such recipe.
            SpecError: the recipe's image.toml is invalid.
            BuildFailed: the build script failed or built an unusable rootfs.
        """
        progress = progress or _quiet
        found = find_recipe(self.recipes_dir, recipe)
        config = load_config(found)  # a bad image.toml fails before minutes of building
        key = recipe_hash(found)
        with self._locked(progress):
            if not rebuild:
                current = self._current_build(found.name, key)
                if current is not None:
                    progress(f"{found.name}: up to date ({current.id[:19]}, recipe {key[:19]})")
                    return current
            started = time.monotonic()
            progress(f"{found.name}: building from {found.directory} (recipe {key[:19]})")
            work = tempfile.mkdtemp(prefix=f"build-{found.name}-", dir=self._tmp)
            try:
                rootfs = os.path.join(work, "rootfs")
                os.mkdir(rootfs)
                os.chmod(rootfs, 0o755)  # the container's "/"; mkdir obeys the umask
                run_build(found, rootfs, progress)
                left_mounted = _mounts_below(rootfs)
                if left_mounted:
                    raise BuildFailed(
                        f"build recipe {found.name!r}: {found.script} left "
                        f"{', '.join(left_mounted)} mounted"
                    )
                check_rootfs(found, rootfs, config)
                progress(f"{found.name}: hashing the layer")
                diff_id, content_bytes = tree_digest(rootfs)
                self._sync()  # layer content on disk before the rename makes it part of the store
                layer = self._commit_layer(rootfs, diff_id)
                image = Image(
                    name=found.name,
                    id=_build_id(config, [diff_id]),
                    layers=[layer],
                    config=config,
                    created=time.time(),
                    source=f"recipe {found.directory}",
                    size_bytes=content_bytes,
                    diff_ids=[diff_id],
                    recipe_hash=key,
                )
                self._write_record(image)
            finally:
                self._discard(work)
            progress(
                f"{found.name}: built {image.id[:19]}, {format_bytes(image.size_bytes)}, "
                f"in {time.monotonic() - started:.1f}s"
            )
            return image

    def _current_build(self, name: str, key: str) -> Image | None:
        path = self._record_path(name)
        if not os.path.exists(path):
            return None
        image = self._load(path)
        if image.recipe_hash != key or not all(os.path.isdir(d) for d in image.layers):
            return None
        return image

    # -- importing ------------------------------------------------------------------------

    def import_(
        self,
        path: str,
        name: str | None = None,
        progress: Progress | None = None,
        limits: ImportLimits | None = None,
        source: str | None = None,
        repo_digest: str = "",
    ) -> Image:
        """Import an OCI layout directory, OCI archive or docker-archive tarball as ``name``.

        ``name`` defaults to the image's own reference (annotation or RepoTags), else the
        archive's file name. An existing image of that name is replaced (its layers stay for
        containers still using them; see ``prune``). ``limits`` caps what the import may
        write (default: ``ImportLimits()``: 4 GiB a layer, 8 GiB an image, 500,000 files).
        ``source`` and ``repo_digest`` go into the record (pull.py: where the image came from;
        ``source`` defaults to ``path``).

        Raises:
            SpecError: bad name, not an image, unknown media type, digest or size mismatch,
            truncated archive, or an unsafe layer member (path escape, symlink traversal, hard
            link outside the layer, device node, sparse file).
            ImportLimitExceeded: a cap of ``limits`` is crossed (a SpecError).
            KernelError: the host failed (a full data root: ENOSPC), naming the path.
            In every case nothing is left behind: no record, no layer, no temporary file.
        """
        progress = progress or _quiet
        limits = limits or ImportLimits()
        wanted = parse_name(name) if name is not None else None
        started = time.monotonic()
        plan = oci.read_image(path, wanted, limits)
        with plan.source, self._locked(progress):
            try:
                image = self._import_plan(plan, path, limits, progress, source, repo_digest)
            except FcrunError:
                raise
            except OSError as exc:
                raise _host_error("import image into", self.paths.data_root, exc) from None
        progress(
            f"{plan.name}: imported {image.id[:19]}, {format_bytes(image.size_bytes)}, "
            f"in {time.monotonic() - started:.1f}s"
        )
        return image

    def _import_plan(
        self,
        plan: oci.ImportPlan,
        path: str,
        limits: ImportLimits,
        progress: Progress,
        source: str | None = None,
        repo_digest: str = "",
    ) -> Image:
        """Extract, commit and record the image ``plan`` describes (the store lock is held)."""
        progress(f"{plan.name}: importing {plan.format} {path} ({len(plan.layers)} layers)")
        budget = ImportBudget(limits)
        staged: dict[str, tuple[str, int]] = {}  # diff_id -> (tmp dir, content bytes)
        try:
            diff_ids = [
                self._stage_layer(plan, i, staged, budget, progress)
                for i in range(len(plan.layers))
            ]
            diff_ids = _topmost_once(diff_ids)
            self._sync()  # layer content on disk before the renames make it part of the store
            committed = []  # layers this import adds to the store
            try:
                for diff_id, (tmp, _) in staged.items():
                    if not os.path.isdir(self.layer_dir(diff_id)):
                        committed.append(diff_id)
                    self._commit_layer(tmp, diff_id)
                size = sum(
                    staged[d][1] if d in staged else tree_content_bytes(self.layer_dir(d))
                    for d in diff_ids
                )
                image = Image(
                    name=plan.name,
                    id=plan.image_id,
                    layers=[self.layer_dir(d) for d in diff_ids],
                    config=plan.config,
                    created=time.time(),
                    source=source or os.path.abspath(path),
                    size_bytes=size,
                    diff_ids=diff_ids,
                    repo_digest=repo_digest,
                )
                self._write_record(image)
            except BaseException:
                # Without a record the layers this import added belong to nothing: take them
                # back (a full disk must not leave orphans for `prune` to find).
                for diff_id in committed:
                    self._discard(self.layer_dir(diff_id))
                raise
        finally:
            for tmp, _ in staged.values():
                self._discard(tmp)  # a no-op for committed layers
        return image

    def _stage_layer(
        self,
        plan: oci.ImportPlan,
        index: int,
        staged: dict[str, tuple[str, int]],
        budget: ImportBudget,
        progress: Progress,
    ) -> str:
        """Verify layer ``index`` and extract it into a tmp dir unless the store has it.

        Returns its diff_id; a new extraction is added to ``staged``.
        """
        ref = plan.layers[index]
        label = ref.digest or ref.path
        budget.start_layer(label)
        step = f"{plan.name}: layer {index + 1}/{len(plan.layers)} {label[:19]}"
        if ref.digest is not None:
            oci_source.verify_blob(plan.source, ref.path, ref.digest, ref.size)
        if ref.diff_id and (ref.diff_id in staged or os.path.isdir(self.layer_dir(ref.diff_id))):
            if ref.digest is None:
                # A legacy docker-archive names a layer blob by id, not digest: only the
                # diff_id says what it holds, so hash it even though nothing is extracted.
                self._verify_diff_id(plan.source, ref, label, budget)
            progress(f"{step}: already stored")
            return ref.diff_id
        progress(f"{step}: extracting")
        diff_id, tmp, content_bytes = self._extract(plan.source, ref, label, budget)
        if diff_id in staged:  # the same content twice in one image
            self._discard(tmp)
        else:
            staged[diff_id] = (tmp, content_bytes)
        return diff_id

    def _extract(
        self, source: oci_source.Source, ref: oci.LayerRef, label: str, budget: ImportBudget
    ) -> tuple[str, str, int]:
        """Extract one layer blob into a new tmp dir; check its diff_id.

        Resource handling: the tmp dir is the caller's once this returns; on error it is removed.
        """
        try:
            tmp = tempfile.mkdtemp(prefix="layer-", dir=self._tmp)
        except OSError as exc:
            raise _host_error("create layer directory in", self._tmp, exc) from None
        try:
            os.chmod(tmp, 0o755)
            budget.add_files()  # the layer's root directory
            with self._uncompressed(source, ref, label, budget) as reader:
                with LayerExtractor(tmp, label, marks=self._marks, budget=budget) as extractor:
                    extractor.extract(reader)  # type: ignore[arg-type]
                _drain(reader, label)  # the tar's trailing padding counts in the diff_id
            _check_diff_id(reader, ref, label)
            return reader.digest, tmp, extractor.content_bytes
        except BaseException:
            self._discard(tmp)
            raise

    def _verify_diff_id(
        self, source: oci_source.Source, ref: oci.LayerRef, label: str, budget: ImportBudget
    ) -> None:
        with self._uncompressed(source, ref, label, budget) as reader:
            _drain(reader, label)
        _check_diff_id(reader, ref, label)

    @contextlib.contextmanager
    def _uncompressed(
        self, source: oci_source.Source, ref: oci.LayerRef, label: str, budget: ImportBudget
    ) -> Iterator[HashingReader]:
        with source.open(ref.path) as blob:
            compression = ref.compression
            if compression is None:
                compression = sniff_compression(blob.read(4), label)
                blob.seek(0)
            yield HashingReader(open_uncompressed(blob, compression), on_read=budget.add_read)

    # -- removing -------------------------------------------------------------------------

    def remove(self, name: str, in_use: Callable[[Image], list[str]] | None = None) -> Image:
        """Remove an image and those of its layers no other image uses.

        ``in_use`` returns the names of containers using the image; any name refuses removal.

        Raises:
            NotFound: no such image.
            IncorrectStatus: containers use it.
        """
        canonical = parse_name(name)
        with self._locked(_quiet):
            image = self.get(canonical)
            users = in_use(image) if in_use else []
            if users:
                raise IncorrectStatus(
                    f"image {canonical!r} is in use by container(s) {', '.join(sorted(users))}; "
                    "remove them first"
                )
            os.unlink(self._record_path(canonical))
            still_used = {layer for other in self.list() for layer in other.layers}
            for layer in image.layers:
                if layer not in still_used:
                    self._discard(layer)
        return image

    def prune(self, keep_layers: Iterable[str] = ()) -> list[str]:
        """Remove layers that no image uses and that are not in ``keep_layers`` (layer dirs
        of running containers). Returns the removed directories."""
        with self._locked(_quiet):
            used = {layer for image in self.list() for layer in image.layers} | set(keep_layers)
            try:
                names = sorted(os.listdir(self.paths.layers))
            except FileNotFoundError:
                return []
            removed = []
            for name in names:
                layer = os.path.join(self.paths.layers, name)
                if layer not in used:
                    self._discard(layer)
                    removed.append(layer)
            return removed

    # -- plumbing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, progress: Progress) -> Iterator[None]:
        """Hold the store lock; clear debris that a crashed writer left in the tmp dir.

        Resource handling: the lock is an flock on ``images.lock``, released when its fd closes,
        so a killed process never leaves the store locked.
        """
        self._make_dirs()
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress(f"waiting for another image build or import ({self._lock_path})")
                fcntl.flock(fd, fcntl.LOCK_EX)
            for leftover in os.listdir(self._tmp):
                self._discard(os.path.join(self._tmp, leftover))
            yield
        finally:
            os.close(fd)

    def _make_dirs(self) -> None:
        # Layers hold images' setuid binaries: host users must not reach them (docker: 0700).
        for path, mode in (
            (self.paths.data_root, 0o711),
            (self.paths.images, 0o755),
            (self.paths.layers, 0o700),
            (self._tmp, 0o700),
        ):
            try:
                os.makedirs(path, mode=mode, exist_ok=True)
            except OSError as exc:
                raise KernelError.from_oserror("create directory", path, exc) from None

    def _sync(self) -> None:
        """syncfs(2) the store's filesystem: cheaper than fsync on each of thousands of files,
        and unlike sync(2) it does not wait for every other filesystem's dirty pages."""
        fd = os.open(self._tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sc.syncfs(fd)
        except OSError as exc:
            raise KernelError.from_oserror("syncfs", self._tmp, exc) from None
        finally:
            os.close(fd)

    def _record_path(self, canonical: str) -> str:
        return record_path(self.paths, canonical)

    def _load(self, path: str) -> Image:
        return load_record(self.paths, path)

    def _write_record(self, image: Image) -> None:
        write_atomic(self._record_path(image.name), msgspec.json.format(msgspec.json.encode(image)),
                     mode=0o644, what="image record")

    def _commit_layer(self, tmp: str, diff_id: str) -> str:
        """Rename a finished layer into place; keep the existing one if it is already there."""
        final = self.layer_dir(diff_id)
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise KernelError.from_oserror("rename layer into", final, exc) from None
            self._discard(tmp)  # same content is stored already
        _fsync_dir(self.paths.layers)
        return final

    def _discard(self, path: str) -> None:
        """Delete a tree: first move it into the tmp dir, so a half-deleted tree is never
        left under a layer's name; detach anything mounted inside first."""
        if not os.path.lexists(path):
            return
        _unmount_below(path)
        if os.path.dirname(path) != self._tmp:
            doomed = os.path.join(
                self._tmp, "rm-" + os.path.basename(path) + "-" + os.urandom(4).hex()
            )
            os.rename(path, doomed)
            path = doomed
        if os.path.isdir(path) and not os.path.islink(path):
            if os.geteuid() != 0:
                _make_tree_writable(path)
            shutil.rmtree(path)
        else:
            os.unlink(path)


def _make_tree_writable(root: str) -> None:
    """Give the owner rwx on every directory below ``root``, so a non-root user can delete a
    layer whose tar made directories read-only (root is not stopped by modes)."""
    stack = [root]
    while stack:
        directory = stack.pop()
        with contextlib.suppress(OSError):  # only real directories are stacked: no symlink
            os.chmod(directory, 0o700)
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))


def _host_error(operation: str, default_path: str, exc: OSError) -> KernelError:
    """A KernelError naming the path the kernel refused (or ``default_path``)."""
    path = exc.filename if isinstance(exc.filename, str) else default_path
    return KernelError.from_oserror(operation, path, exc)


def _drain(reader: HashingReader, label: str) -> None:
    try:
        reader.drain()
    except (EOFError, OSError, zlib.error, tarfile.TarError) as exc:
        raise SpecError(f"layer {label}: truncated or corrupt: {exc}") from None


def _check_diff_id(reader: HashingReader, ref: oci.LayerRef, label: str) -> None:
    if ref.diff_id and reader.digest != ref.diff_id:
        raise SpecError(
            f"layer {label}: uncompressed content hashes to {reader.digest}, "
            f"the image config says {ref.diff_id}"
        )


def _build_id(config: ImageConfig, diff_ids: list[str]) -> str:
    """A built image's id: the digest of what it is (config and layers)."""
    data = msgspec.json.encode({"config": config, "diff_ids": diff_ids})
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _topmost_once(diff_ids: list[str]) -> list[str]:
    """Keep only the topmost copy of a layer listed twice (often the empty layer).

    The same directory twice in one overlayfs lowerdir is refused by the kernel, and dropping
    the lower copy changes nothing: the upper copy provides every file it would.
    """
    seen: set[str] = set()
    kept = []
    for diff_id in reversed(diff_ids):
        if diff_id not in seen:
            seen.add(diff_id)
            kept.append(diff_id)
    return kept[::-1]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path).rstrip("/") + "/"
    return sorted((p for p in read_mountpoints() if (p + "/").startswith(prefix)), key=len, reverse=True)


def _unmount_below(path: str) -> None:
    """Detach whatever is mounted inside ``path``, deepest first.

    A build may die with /proc or /dev still mounted in its chroot; deleting through such a
    mount would delete the host's files.

    Raises:
        KernelError: umount2 failed.
    """
    for mount_point in _mounts_below(path):
        try:
            sc.umount2(os.fsencode(mount_point), sc.MNT_DETACH)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: already gone with a parent mount
                raise KernelError.from_oserror("umount2(MNT_DETACH)", mount_point, exc) from None

