"""Images: build them from recipes, import OCI images, keep them as shared read-only layers.

The runtime core needs ``ImageStore(paths).get(name)`` and the ``Image`` it returns: the layer
directories to stack as overlayfs lower dirs (bottom first) and the ``ImageConfig`` to run
(catalog.py reads them without the builders' modules). Names are imported on first use
(PEP 562), so that reading an image does not load the store's build and import code.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "Image": "image", "ImageConfig": "image", "parse_name": "image",
    "BuildFailed": "recipes",
    "ImageStore": "store",
    "get_image": "catalog",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
