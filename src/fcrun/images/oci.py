"""Reading OCI images: layout directories, OCI archives and docker-archive tarballs.

This module turns a path into an ``ImportPlan`` (which blobs are the layers, in which order,
with which digests, and the run config), verifying every JSON blob it reads. It writes
nothing; the store verifies and extracts the layer blobs (``store.ImageStore.import_``).
Reading the files is oci_source.py's job; what the config blob says, oci_config.py's.

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
import os
import platform
import re
from dataclasses import dataclass

import msgspec

from ..errors import SpecError
from .image import ImageConfig, parse_name
from .limits import ImportLimits
from .oci_config import CONFIG_TYPES, ConfigFile, checked_diff_ids, image_config, layer_compression
from .oci_source import DirectorySource, Source, blob_path, open_source, read_json

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
_MAX_INDEX_DEPTH = 4

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


# -- the plan -----------------------------------------------------------------------------


def read_image(
    path: str, wanted_name: str | None = None, limits: ImportLimits | None = None
) -> ImportPlan:
    """Read and check an image's index, manifest and config; say which layers to extract.

    ``wanted_name`` (already canonical) picks among several images in one archive. ``limits``
    bound how much of an archive is read to index it.

    Raises:
        SpecError: not an image, unsupported media type or platform, digest mismatch, missing
        blob, or no name could be derived.

    Resource handling: the plan's ``source`` is open; the caller closes it.
    """
    source = open_source(path, limits)
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
        layout = read_json(source, "oci-layout", None, None, dict)
        version = str(layout.get("imageLayoutVersion", ""))
        if not version.startswith("1."):
            raise SpecError(f"{path}: unsupported imageLayoutVersion {version!r} in oci-layout")
    index: Index = read_json(source, "index.json", None, None, Index)
    candidates = _manifests(source, index.manifests, depth=0)
    desc = _choose(candidates, path, wanted_name)
    manifest_path = blob_path(desc.digest, "index.json")
    manifest: Manifest = read_json(source, manifest_path, desc.digest, desc.size, Manifest)
    if manifest.config.media_type and manifest.config.media_type not in CONFIG_TYPES:
        raise SpecError(
            f"{path}: manifest {desc.digest} is not a container image "
            f"(config media type {manifest.config.media_type!r})"
        )
    cfg_path = blob_path(manifest.config.digest, f"manifest {desc.digest} config")
    config_file: ConfigFile = read_json(
        source, cfg_path, manifest.config.digest, manifest.config.size, ConfigFile
    )
    diff_ids = checked_diff_ids(config_file, len(manifest.layers), cfg_path)
    layers = []
    for i, layer in enumerate(manifest.layers):
        where = f"manifest {desc.digest} layers[{i}]"
        layers.append(
            LayerRef(
                path=blob_path(layer.digest, where),
                digest=layer.digest,
                size=layer.size,
                compression=layer_compression(layer.media_type, layer.digest),
                diff_id=diff_ids[i],
            )
        )
    name = wanted_name or _name_from_annotations(desc, path)
    return ImportPlan(
        name=name,
        image_id=manifest.config.digest,
        config=image_config(config_file, cfg_path),
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
            nested: Index = read_json(source, nested_path, desc.digest, desc.size, Index)
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


def _read_docker_archive(source: Source, path: str, wanted_name: str | None) -> ImportPlan:
    entries: list[DockerArchiveEntry] = read_json(
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
    config_file: ConfigFile = read_json(source, entry.config, cfg_digest, None, ConfigFile)
    if cfg_digest is None:  # not named by its digest: the image id is still its hash
        with source.open(entry.config) as handle:
            cfg_digest = "sha256:" + hashlib.sha256(handle.read()).hexdigest()
    diff_ids = checked_diff_ids(config_file, len(entry.layers), entry.config)
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
        config=image_config(config_file, entry.config),
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
