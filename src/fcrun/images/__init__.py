"""Images: build them from recipes, import OCI images, keep them as shared read-only layers.

The runtime core needs ``ImageStore(paths).get(name)`` and the ``Image`` it returns: the layer
directories to stack as overlayfs lower dirs (bottom first) and the ``ImageConfig`` to run.
"""

from .image import Image, ImageConfig, parse_name
from .recipes import BuildFailed
from .store import ImageStore

__all__ = ["BuildFailed", "Image", "ImageConfig", "ImageStore", "parse_name"]
