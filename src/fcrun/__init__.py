"""fcrun: a reactive container runtime for web applications (the FastContainer architecture).

The library in a few lines (as root)::

    import fcrun

    rt = fcrun.Runtime()
    image = rt.images.get("busybox")
    spec = fcrun.spec_from_image(image, fcrun.RunOptions(args=["sh", "-c", "echo hello"], cpu=0.3))
    container = rt.run("hello", spec, image=image)
    print(container.wait())      # exit code
    rt.delete("hello")

Names are imported on first use (PEP 562), so `fcrun.errors` or the CLI do not pay for the
whole library at start-up.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "AlreadyExists": "errors", "ContainerError": "errors", "FcrunError": "errors",
    "IncorrectStatus": "errors", "KernelError": "errors", "MissingFeature": "errors",
    "NotFound": "errors", "NotPermitted": "errors", "SpecError": "errors",
    "Spec": "runtime.spec", "decode_spec": "runtime.spec", "default_spec": "runtime.spec",
    "encode_spec": "runtime.spec",
    "RunOptions": "runtime.options", "spec_from_image": "runtime.options",
    "Paths": "paths",
    "Container": "runtime.container", "ContainerInfo": "runtime.container", "Runtime": "runtime.lifecycle",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
