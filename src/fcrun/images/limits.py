"""Caps on what one image import may write, and the running count that enforces them.

An image is hostile input that the data root (which also holds the CMDB) must survive: a
gzip bomb, a sparse-file bomb or a layer of a million empty files must fail early and
cleanly, not fill the disk. So every import counts, while it streams:

- per layer: the uncompressed tar bytes read (a bomb is stopped after that many bytes are
  decompressed, whatever it writes) and the file bytes written (what the layer costs on disk);
- per image: the same two sums over the layers this import extracts (layers the store already
  holds cost nothing and do not count);
- per image: the files (tar entries and the directories made on the way to them).

The defaults stop bombs without refusing real images: fcrun's own apache-php image (Debian
with Apache and PHP) is 197 MiB in 7,392 files, measured here; the caps leave such an image 20
times the bytes and 60 times the files, room for a fat framework or node_modules tree. A layer
over 4 GiB or an image over 8 GiB on a host that serves web apps is almost always a mistake
(model weights, build caches) or an attack, and the data root also holds the CMDB. Each cap
is raised per import (``fcrun image import --max-layer-size``) when an image needs it.
"""

from __future__ import annotations

import msgspec

from ..errors import SpecError
from ..units import format_bytes

DEFAULT_MAX_LAYER_BYTES = 4 << 30
DEFAULT_MAX_IMAGE_BYTES = 8 << 30
DEFAULT_MAX_FILES = 500_000
# A tar spends at least one 512-byte header and up to 511 bytes of padding on each file: an
# archive of a whole image may be that much bigger than the image's content.
TAR_BYTES_PER_FILE = 1024

# What a user raises each cap with, for the refusal message.
LAYER_SETTING = "--max-layer-size (ImportLimits.max_layer_bytes)"
IMAGE_SETTING = "--max-image-size (ImportLimits.max_image_bytes)"
FILES_SETTING = "--max-files (ImportLimits.max_files)"


class ImportLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Caps for one import. Sizes in bytes; ``max_files`` counts files of all layers."""

    max_layer_bytes: int = DEFAULT_MAX_LAYER_BYTES
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_files: int = DEFAULT_MAX_FILES

    def __post_init__(self) -> None:
        for name in ("max_layer_bytes", "max_image_bytes", "max_files"):
            if getattr(self, name) <= 0:
                raise SpecError(f"import limit {name} must be positive, not {getattr(self, name)}")

    @property
    def max_archive_bytes(self) -> int:
        """How far (uncompressed) an image archive may reach: its layers plus tar framing."""
        return self.max_image_bytes + TAR_BYTES_PER_FILE * self.max_files


class ImportLimitExceeded(SpecError):
    """An image is bigger than a cap allows. The message names the layer, the cap and the
    setting that raises it."""


class ImportBudget:
    """What one import has used so far; each ``add_*`` raises once a cap is crossed.

    Call ``start_layer`` before each layer extracted, so per-layer counts restart and errors
    name that layer.
    """

    def __init__(self, limits: ImportLimits):
        self.limits = limits
        self.layer = ""
        self.layer_read_bytes = 0
        self.layer_written_bytes = 0
        self.image_read_bytes = 0
        self.image_written_bytes = 0
        self.files = 0

    def start_layer(self, label: str) -> None:
        self.layer = label
        self.layer_read_bytes = 0
        self.layer_written_bytes = 0

    def add_read(self, n: int) -> None:
        """``n`` more uncompressed tar bytes read from the current layer."""
        self.layer_read_bytes += n
        self.image_read_bytes += n
        self._check_bytes("uncompressed tar", self.layer_read_bytes, self.image_read_bytes)

    def check_read(self, n: int) -> None:
        """Refuse before reading (or skipping) a member's ``n`` bytes of data that would cross
        a cap: tarfile skips data it is not asked for block by block, so a header claiming
        10**200 bytes would otherwise keep it reading an empty stream for ever."""
        self._check_bytes(
            "uncompressed tar", self.layer_read_bytes + n, self.image_read_bytes + n
        )

    def check_write(self, n: int) -> None:
        """Refuse before writing ``n`` bytes that would cross a cap (a file's size from its
        header: refusing a 1 TiB sparse file must not first write 4 GiB of it)."""
        self._check_bytes(
            "file content", self.layer_written_bytes + n, self.image_written_bytes + n
        )

    def add_written(self, n: int) -> None:
        """``n`` more bytes written to files of the current layer."""
        self.layer_written_bytes += n
        self.image_written_bytes += n
        self._check_bytes("file content", self.layer_written_bytes, self.image_written_bytes)

    def add_files(self, n: int = 1) -> None:
        self.files += n
        if self.files > self.limits.max_files:
            raise ImportLimitExceeded(
                f"layer {self.layer}: the image has more than {self.limits.max_files:,} files "
                f"(entries and the directories they need); raise {FILES_SETTING} if it is trusted"
            )

    def _check_bytes(self, what: str, layer_bytes: int, image_bytes: int) -> None:
        if layer_bytes > self.limits.max_layer_bytes:
            raise ImportLimitExceeded(
                f"layer {self.layer}: {what} exceeds the layer size cap of "
                f"{format_bytes(self.limits.max_layer_bytes)}; "
                f"raise {LAYER_SETTING} if the image is trusted"
            )
        if image_bytes > self.limits.max_image_bytes:
            raise ImportLimitExceeded(
                f"layer {self.layer}: {what} of the image so far exceeds the image size cap of "
                f"{format_bytes(self.limits.max_image_bytes)}; "
                f"raise {IMAGE_SETTING} if the image is trusted"
            )
