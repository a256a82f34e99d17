"""fcrun: a reactive container runtime for web applications (the FastContainer architecture).

The library in a few lines (as root)::

    import fcrun

    rt = fcrun.Runtime()
    image = rt.images.get("busybox")
    spec = fcrun.spec_from_image(image, fcrun.RunOptions(args=["sh", "-c", "echo hello"], cpu=0.3))
    container = rt.run("hello", spec, image=image)
    print(container.wait())      # exit code
    rt.delete("hello")
"""

from .errors import (
    AlreadyExists,
    ContainerError,
    FcrunError,
    IncorrectStatus,
    KernelError,
    MissingFeature,
    NotFound,
    NotPermitted,
    SpecError,
)
from .oci import Spec, decode_spec, default_spec, encode_spec
from .options import RunOptions, spec_from_image
from .paths import Paths
from .runtime import Container, ContainerInfo, Runtime

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists", "Container", "ContainerError", "ContainerInfo", "FcrunError", "IncorrectStatus",
    "KernelError", "MissingFeature", "NotFound", "NotPermitted", "Paths", "RunOptions", "Runtime",
    "Spec", "SpecError", "decode_spec", "default_spec", "encode_spec", "spec_from_image",
]
