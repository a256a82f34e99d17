"""Reading the image store: an image by name, without the build and import machinery.

What a container's creation needs of an image is its record (`<data root>/images/<name>.json`)
and its layer directories. store.py writes both and reads them through this module; the
runtime and `fcrun run` read them here, so that a run does not load the builders' and
importers' modules (tarfile, hashlib, tomllib, pathlib...: ~11 ms of a `fcrun run` without a
fork-server).
"""

from __future__ import annotations

import os
import re

import msgspec

from ..errors import FcrunError, NotFound, SpecError
from ..paths import Paths
from .image import Image, parse_name

RECORD_SUFFIX = ".json"
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")  # the only algorithm OCI requires, and fcrun reads

_record_decoder = msgspec.json.Decoder(Image)


def digest_hex(digest: str, where: str) -> str:
    """``sha256:<hex>`` -> ``<hex>``.

    Raises:
        SpecError: not a sha256 digest.
    """
    m = DIGEST.fullmatch(digest)
    if not m:
        raise SpecError(f"unsupported or malformed digest {digest!r}: fcrun reads sha256 digests", where)
    return m.group(1)


def record_path(paths: Paths, canonical: str) -> str:
    return os.path.join(paths.images, canonical + RECORD_SUFFIX)


def layer_dir(paths: Paths, diff_id: str) -> str:
    return os.path.join(paths.layers, digest_hex(diff_id, "diff_id"))


def load_record(paths: Paths, path: str) -> Image:
    """The image record at `path`, its layers where this store keeps them.

    Raises:
        FcrunError: the record is corrupt.
    """
    try:
        with open(path, "rb") as f:
            image = _record_decoder.decode(f.read())
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise FcrunError(f"image record {path} is corrupt: {exc}") from None
    # Layer paths follow the store, so a data root can be moved or mounted elsewhere.
    if image.diff_ids:
        image.layers = [layer_dir(paths, d) for d in image.diff_ids]
    return image


def get_image(paths: Paths, name: str, recipes_dir: str | None = None) -> Image:
    """The image called ``name`` (ImageStore.get).

    `recipes_dir`: where build recipes are looked up for the not-found message (default:
    recipes.default_recipes_dir()).

    Raises:
        SpecError: ``name`` is not a valid image name.
        NotFound: no such image (the message says how to build it when a recipe exists),
        or one of its layers is gone.
    """
    canonical = parse_name(name)
    path = record_path(paths, canonical)
    if not os.path.exists(path):
        from .recipes import default_recipes_dir, list_recipes  # only to say how to get it

        if ":" not in canonical and canonical in list_recipes(recipes_dir or default_recipes_dir()):
            raise NotFound(f"image {name!r} not found; build it with `fcrun image build {canonical}`")
        raise NotFound(f"image {name!r} not found; `fcrun image ls` lists images, "
                       "`fcrun image import PATH` adds one")
    image = load_record(paths, path)
    for layer in image.layers:
        if not os.path.isdir(layer):
            raise NotFound(f"image {name!r}: layer {layer} is missing; build or import the image again")
    return image
