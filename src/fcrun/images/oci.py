"""Reading OCI images: layout directories, OCI archives and docker-archive tarballs.

This module turns a path into an ``ImportPlan`` (which blobs are the layers, in which order,
with which digests, and the run config), verifying every JSON blob it reads. It writes
nothing; the store verifies and extracts the layer blobs (``store.ImageStore.import_``).

Formats (image-spec ``image-layout.md``; docker's ``image/tarexport``):

- OCI layout: ``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``; a directory, or a tar
  of one (``skopeo copy ... oci-archive:``, and ``docker save`` since docker 25, which also
  writes the legacy ``manifest.json``; the OCI index is preferred then);
- docker-archive (``docker save`` before 25): ``manifest.json`` naming a config file
  ``<hex>.json`` and layer tars ``<id>/layer.tar``; layers are checked against the config's
  ``rootfs.diff_ids``.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import re
import tarfile
from dataclasses import dataclass
from typing import IO, Any

import msgspec

from ..errors import SpecError
from .image import ImageConfig, parse_name

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)

# media type -> compression ("" = plain tar)
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_MAX_JSON_BYTES = 16 << 20  # manifests and configs are small; refuse to read a huge "JSON" blob
_MAX_INDEX_DEPTH = 4
_CHUNK = 1 << 20

# platform.machine() -> OCI architecture (image-spec config.md, Go's GOARCH)
_GOARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


class Platform(msgspec.Struct, kw_only=True):
    architecture: str = ""
    os: str = ""
    variant: str = ""


class Descriptor(msgspec.Struct, kw_only=True, rename="camel"):
    media_type: str = ""
    digest: str
    size: int
    annotations: dict[str, str] | None = None
    platform: Platform | None = None


class Index(msgspec.Struct, kw_only=True, rename="camel"):
    media_type: str = ""
    manifests: list[Descriptor] = []


class Manifest(msgspec.Struct, kw_only=True, rename="camel"):
    media_type: str = ""
    config: Descriptor
    layers: list[Descriptor]


class ContainerConfig(msgspec.Struct, kw_only=True, rename="pascal"):
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] | None = None
    working_dir: str = ""
    user: str = ""
    exposed_ports: dict[str, object] | None = None
    stop_signal: str = ""


class RootFS(msgspec.Struct, kw_only=True):
    type: str = "layers"
    diff_ids: list[str] = []


class ConfigFile(msgspec.Struct, kw_only=True):
    architecture: str = ""
    os: str = ""
    config: ContainerConfig | None = None
    rootfs: RootFS | None = None


class DockerArchiveEntry(msgspec.Struct, kw_only=True, rename="pascal"):
    config: str
    repo_tags: list[str] | None = None
    layers: list[str]


@dataclass
class LayerRef:
    """One layer blob to verify and extract."""

    path: str  # inside the source
    digest: str | None  # of the blob as stored; None in legacy docker-archives (diff_id checks it)
    size: int | None
    compression: str | None  # "gzip", "" (plain), None: sniff the blob
    diff_id: str | None  # sha256 of the uncompressed tar, from the config


@dataclass
class ImportPlan:
    name: str
    image_id: str
    config: ImageConfig
    layers: list[LayerRef]
    source: "Source"
    format: str  # "oci-layout", "oci-archive", "docker-archive"


# -- sources ------------------------------------------------------------------------------


class Source:
    """Files of an image layout, in a directory or a tar. Paths are relative, '/'-separated."""

    label: str

    def open(self, path: str) -> IO[bytes]:
        raise NotImplementedError

    def size(self, path: str) -> int:
        raise NotImplementedError

    def has(self, path: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def missing(self, path: str) -> SpecError:
        return SpecError(f"{self.label}: {path} is missing (truncated or incomplete image?)")


class DirectorySource(Source):
    def __init__(self, root: str):
        self.root = root
        self.label = root

    def _path(self, path: str) -> str:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts or path.startswith("/"):
            raise SpecError(f"{self.label}: path {path!r} escapes the image layout")
        return os.path.join(self.root, *parts)

    def open(self, path: str) -> IO[bytes]:
        try:
            return open(self._path(path), "rb")
        except FileNotFoundError:
            raise self.missing(path) from None

    def size(self, path: str) -> int:
        try:
            return os.stat(self._path(path)).st_size
        except FileNotFoundError:
            raise self.missing(path) from None

    def has(self, path: str) -> bool:
        return os.path.isfile(self._path(path))


class TarSource(Source):
    """An image layout inside a tar (plain or gzip). Members are read in place, not unpacked.

    Resource handling: keeps the archive open until ``close()``.
    """

    def __init__(self, path: str):
        self.label = path
        try:
            self._tar = tarfile.open(path, "r:*")
        except (tarfile.TarError, EOFError, OSError) as exc:
            # tarfile lists every compression it tried; the last line is the plain-tar verdict
            reason = str(exc).splitlines()[-1].removeprefix("- method tar: ")
            raise SpecError(
                f"{path}: not a readable tar archive (truncated, or not a tar): {reason}"
            ) from None
        try:
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            self._tar.close()
            raise SpecError(f"{path}: truncated or corrupt tar archive: {exc}") from None
        self._members = {_normalize(m.name): m for m in members}

    def _member(self, path: str) -> tarfile.TarInfo:
        member = self._members.get(_normalize(path))
        if member is None:
            raise self.missing(path)
        return member

    def open(self, path: str) -> IO[bytes]:
        try:
            handle = self._tar.extractfile(self._member(path))
        except (tarfile.TarError, KeyError) as exc:
            raise SpecError(f"{self.label}: cannot read {path}: {exc}") from None
        if handle is None:
            raise SpecError(f"{self.label}: {path} is not a regular file")
        return handle

    def size(self, path: str) -> int:
        member = self._member(path)
        if member.issym() or member.islnk():
            with self.open(path) as handle:
                return handle.seek(0, io.SEEK_END)
        return member.size

    def has(self, path: str) -> bool:
        return _normalize(path) in self._members

    def close(self) -> None:
        self._tar.close()


def _normalize(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def open_source(path: str) -> Source:
    """Open a layout directory or an archive.

    Raises:
        SpecError: the path does not exist or is neither a directory nor a tar.
    """
    if os.path.isdir(path):
        return DirectorySource(path)
    if not os.path.exists(path):
        raise SpecError(f"image path {path!r} does not exist", "PATH")
    return TarSource(path)


# -- reading and checking blobs -----------------------------------------------------------


def blob_path(digest: str, where: str) -> str:
    """``sha256:<hex>`` -> ``blobs/sha256/<hex>``.

    Raises:
        SpecError: not a sha256 digest (the only algorithm OCI requires and fcrun reads).
    """
    m = _DIGEST.fullmatch(digest)
    if not m:
        raise SpecError(
            f"unsupported or malformed digest {digest!r}: fcrun reads sha256 digests", where
        )
    return f"blobs/sha256/{m.group(1)}"


def verify_blob(source: Source, path: str, digest: str | None, size: int | None) -> int:
    """Hash a blob and compare it with its descriptor. Returns its size.

    Raises:
        SpecError: size or digest mismatch, or the blob is missing or truncated.
    """
    actual_size = source.size(path)
    if size is not None and actual_size != size:
        raise SpecError(
            f"{source.label}: blob {digest or path}: size is {actual_size} bytes, "
            f"its descriptor says {size}"
        )
    sha = hashlib.sha256()
    try:
        with source.open(path) as handle:
            while chunk := handle.read(_CHUNK):
                sha.update(chunk)
    except (tarfile.TarError, OSError) as exc:
        raise SpecError(
            f"{source.label}: blob {digest or path}: read failed (truncated archive?): {exc}"
        ) from None
    actual = "sha256:" + sha.hexdigest()
    if digest is not None and actual != digest:
        raise SpecError(
            f"{source.label}: blob {path}: digest mismatch: content hashes to {actual}, "
            f"expected {digest}"
        )
    return actual_size


def _read_json(source: Source, path: str, digest: str | None, size: int | None, type_: Any) -> Any:
    """Read, verify and decode a JSON blob (``type_``: a Struct, ``dict``, ``list[...]``).

    Raises:
        SpecError: missing, too large, digest mismatch, not JSON, or not of that shape.
    """
    if source.size(path) > _MAX_JSON_BYTES:
        raise SpecError(f"{source.label}: {path} is too large for a JSON document")
    verify_blob(source, path, digest, size)
    with source.open(path) as handle:
        data = handle.read()
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise SpecError(f"{source.label}: {path}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise SpecError(f"{source.label}: {path} is not valid JSON: {exc}") from None


# -- the plan -----------------------------------------------------------------------------


def read_image(path: str, wanted_name: str | None = None) -> ImportPlan:
    """Read and check an image's index, manifest and config; say which layers to extract.

    ``wanted_name`` (already canonical) picks among several images in one archive.

    Raises:
        SpecError: not an image, unsupported media type or platform, digest mismatch, missing
        blob, or no name could be derived.

    Resource handling: the plan's ``source`` is open; the caller closes it.
    """
    source = open_source(path)
    try:
        if source.has("index.json"):
            plan = _read_oci(source, path, wanted_name)
        elif source.has("manifest.json"):
            plan = _read_docker_archive(source, path, wanted_name)
        else:
            raise SpecError(
                f"{path}: not an OCI layout, OCI archive or docker-archive "
                "(no index.json or manifest.json)",
                "PATH",
            )
    except BaseException:
        source.close()
        raise
    return plan


def host_platform() -> str:
    machine = platform.machine()
    return f"linux/{_GOARCH.get(machine, machine)}"


def _platform_text(desc: Descriptor) -> str:
    p = desc.platform
    if p is None:
        return "unspecified"
    return f"{p.os}/{p.architecture}" + (f"/{p.variant}" if p.variant else "")


def _read_oci(source: Source, path: str, wanted_name: str | None) -> ImportPlan:
    if source.has("oci-layout"):
        layout = _read_json(source, "oci-layout", None, None, dict)
        version = str(layout.get("imageLayoutVersion", ""))
        if not version.startswith("1."):
            raise SpecError(f"{path}: unsupported imageLayoutVersion {version!r} in oci-layout")
    index: Index = _read_json(source, "index.json", None, None, Index)
    candidates = _manifests(source, index.manifests, depth=0)
    desc = _choose(candidates, path, wanted_name)
    manifest_path = blob_path(desc.digest, "index.json")
    manifest: Manifest = _read_json(source, manifest_path, desc.digest, desc.size, Manifest)
    if manifest.config.media_type and manifest.config.media_type not in CONFIG_TYPES:
        raise SpecError(
            f"{path}: manifest {desc.digest} is not a container image "
            f"(config media type {manifest.config.media_type!r})"
        )
    cfg_path = blob_path(manifest.config.digest, f"manifest {desc.digest} config")
    config_file: ConfigFile = _read_json(
        source, cfg_path, manifest.config.digest, manifest.config.size, ConfigFile
    )
    diff_ids = _diff_ids(config_file, len(manifest.layers), cfg_path)
    layers = []
    for i, layer in enumerate(manifest.layers):
        where = f"manifest {desc.digest} layers[{i}]"
        layers.append(
            LayerRef(
                path=blob_path(layer.digest, where),
                digest=layer.digest,
                size=layer.size,
                compression=_layer_compression(layer.media_type, layer.digest),
                diff_id=diff_ids[i],
            )
        )
    name = wanted_name or _name_from_annotations(desc, path)
    return ImportPlan(
        name=name,
        image_id=manifest.config.digest,
        config=_image_config(config_file, cfg_path),
        layers=layers,
        source=source,
        format="oci-layout" if isinstance(source, DirectorySource) else "oci-archive",
    )


def _manifests(source: Source, descs: list[Descriptor], depth: int) -> list[Descriptor]:
    """Image manifests listed by an index, following nested indexes."""
    found: list[Descriptor] = []
    for desc in descs:
        annotations = desc.annotations or {}
        if annotations.get("vnd.docker.reference.type") == "attestation-manifest":
            continue  # buildkit provenance, not an image
        if desc.media_type in INDEX_TYPES:
            if depth >= _MAX_INDEX_DEPTH:
                raise SpecError(f"{source.label}: indexes nested deeper than {_MAX_INDEX_DEPTH}")
            nested_path = blob_path(desc.digest, "index")
            nested: Index = _read_json(source, nested_path, desc.digest, desc.size, Index)
            for child in _manifests(source, nested.manifests, depth + 1):
                if child.annotations is None and desc.annotations:
                    child.annotations = desc.annotations  # the name is on the outer descriptor
                found.append(child)
        elif desc.media_type in MANIFEST_TYPES or not desc.media_type:
            found.append(desc)
        else:
            raise SpecError(
                f"{source.label}: index entry {desc.digest} has unknown media type "
                f"{desc.media_type!r}"
            )
    return found


def _choose(candidates: list[Descriptor], path: str, wanted_name: str | None) -> Descriptor:
    if not candidates:
        raise SpecError(f"{path}: index.json lists no image manifest")
    if wanted_name and len(candidates) > 1:
        # ref.name is often only a tag ("v2" in a layout holding several): NAME "app:v2" picks it.
        tag = wanted_name.partition(":")[2] or "latest"
        named = [
            d
            for d in candidates
            if _ref_name(d) == wanted_name
            or (d.annotations or {}).get(REF_NAME) in (wanted_name, tag)
        ]
        candidates = named or candidates
    if len(candidates) > 1:
        host = host_platform()
        matching = [d for d in candidates if _os_arch(d) == host] or [
            d for d in candidates if d.platform is None
        ]
        if not matching:
            listed = ", ".join(_platform_text(d) for d in candidates)
            raise SpecError(f"{path}: no image for this host's platform {host} (has {listed})")
        candidates = matching
    if len(candidates) > 1:
        listed = ", ".join(f"{d.digest[:19]} ({_ref_name(d) or 'unnamed'})" for d in candidates)
        raise SpecError(
            f"{path}: holds {len(candidates)} images for this platform: {listed}; "
            "give NAME to pick one"
        )
    return candidates[0]


def _os_arch(desc: Descriptor) -> str:
    return f"{desc.platform.os}/{desc.platform.architecture}" if desc.platform else ""


def _ref_name(desc: Descriptor) -> str | None:
    annotations = desc.annotations or {}
    ref = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME)
    if not ref:
        return None
    try:
        return name_from_reference(ref)
    except SpecError:
        return None


def _name_from_annotations(desc: Descriptor, path: str) -> str:
    annotations = desc.annotations or {}
    full = annotations.get(CONTAINERD_NAME)
    ref = annotations.get(REF_NAME)
    if full:
        return _derive(full, path)
    if ref and ("/" in ref or ":" in ref):
        return _derive(ref, path)
    if ref:  # skopeo's oci:DIR:TAG writes only the tag
        return _derive(f"{archive_stem(path)}:{ref}", path)
    return _derive(archive_stem(path), path)


def _derive(reference: str, path: str) -> str:
    try:
        return name_from_reference(reference)
    except SpecError:
        raise SpecError(
            f"{path}: cannot derive an image name from {reference!r}; give NAME", "NAME"
        ) from None


def name_from_reference(reference: str) -> str:
    """'docker.io/library/nginx:1.25@sha256:...' -> 'nginx:1.25'; 'busybox:latest' -> 'busybox'.

    Raises:
        SpecError: what is left is not a valid image name.
    """
    # The registry and repository path say where an image lives, not what it is called.
    last = reference.split("@", 1)[0].rsplit("/", 1)[-1]
    base, sep, tag = last.partition(":")
    return parse_name(base.lower() + sep + tag)


def archive_stem(path: str) -> str:
    stem = os.path.basename(os.path.normpath(path)).lower()
    for suffix in (".tar.gz", ".tgz", ".tar", ".oci"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem


def _layer_compression(media_type: str, digest: str) -> str:
    if media_type in LAYER_TYPES:
        return LAYER_TYPES[media_type]
    if "zstd" in media_type:
        raise SpecError(f"layer {digest}: zstd-compressed layers ({media_type}) are not supported")
    raise SpecError(f"layer {digest}: unknown layer media type {media_type!r}")


def _diff_ids(config_file: ConfigFile, layer_count: int, cfg_path: str) -> list[str | None]:
    if config_file.os and config_file.os != "linux":
        raise SpecError(f"{cfg_path}: image is for os {config_file.os!r}, not linux")
    diff_ids = config_file.rootfs.diff_ids if config_file.rootfs else []
    if not diff_ids:
        return [None] * layer_count
    if len(diff_ids) != layer_count:
        raise SpecError(
            f"{cfg_path}: config lists {len(diff_ids)} diff_ids for {layer_count} layers"
        )
    for i, diff_id in enumerate(diff_ids):
        blob_path(diff_id, f"{cfg_path} $.rootfs.diff_ids[{i}]")
    return list(diff_ids)


def _image_config(config_file: ConfigFile, cfg_path: str) -> ImageConfig:
    cc = config_file.config or ContainerConfig()
    ports: set[int] = set()
    for spec in cc.exposed_ports or {}:
        number, _, proto = spec.partition("/")
        if proto not in ("", "tcp"):
            continue  # fcrun forwards HTTP: only TCP ports matter
        if not number.isdigit():
            raise SpecError(f"{cfg_path}: bad exposed port {spec!r}", "$.config.ExposedPorts")
        ports.add(int(number))
    try:
        return ImageConfig(
            entrypoint=list(cc.entrypoint or []),
            cmd=list(cc.cmd or []),
            env=list(cc.env or []),
            workdir=cc.working_dir or "/",
            user=cc.user,
            exposed_ports=sorted(ports),
            stop_signal=cc.stop_signal or "SIGTERM",
        )
    except ValueError as exc:
        raise SpecError(f"{cfg_path}: {exc}", "$.config") from None


def _read_docker_archive(source: Source, path: str, wanted_name: str | None) -> ImportPlan:
    entries: list[DockerArchiveEntry] = _read_json(
        source, "manifest.json", None, None, list[DockerArchiveEntry]
    )
    if not entries:
        raise SpecError(f"{path}: manifest.json lists no image")
    if len(entries) > 1:
        named = [e for e in entries if wanted_name in _docker_names(e)]
        if len(named) != 1:
            tags = "; ".join(", ".join(e.repo_tags or ["untagged"]) for e in entries)
            raise SpecError(f"{path}: holds {len(entries)} images ({tags}); give NAME to pick one")
        entries = named
    entry = entries[0]
    cfg_digest = _digest_of_path(entry.config)
    config_file: ConfigFile = _read_json(source, entry.config, cfg_digest, None, ConfigFile)
    if cfg_digest is None:  # not named by its digest: the image id is still its hash
        with source.open(entry.config) as handle:
            cfg_digest = "sha256:" + hashlib.sha256(handle.read()).hexdigest()
    diff_ids = _diff_ids(config_file, len(entry.layers), entry.config)
    layers = [
        LayerRef(
            path=p, digest=_digest_of_path(p), size=None, compression=None, diff_id=diff_ids[i]
        )
        for i, p in enumerate(entry.layers)
    ]
    names = _docker_names(entry)
    name = wanted_name or (names[0] if names else _derive(archive_stem(path), path))
    return ImportPlan(
        name=name,
        image_id=cfg_digest,
        config=_image_config(config_file, entry.config),
        layers=layers,
        source=source,
        format="docker-archive",
    )


def _docker_names(entry: DockerArchiveEntry) -> list[str]:
    names = []
    for tag in entry.repo_tags or []:
        try:
            names.append(name_from_reference(tag))
        except SpecError:
            continue
    return names


def _digest_of_path(path: str) -> str | None:
    """Blobs named by their digest (``blobs/sha256/<hex>``, legacy ``<hex>.json``) are checked."""
    m = re.fullmatch(r"(?:.*/)?(?:sha256/)?([0-9a-f]{64})(?:\.json)?", path)
    return "sha256:" + m.group(1) if m else None
