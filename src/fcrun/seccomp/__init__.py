"""Seccomp for containers: OCI profiles (profile.py), the default every container gets
(default.py), compiling with libseccomp in the parent (compiler.py, libseccomp.py), and
loading the result in the child just before execve (install.py).
"""

from ..lazy import lazy_exports

# Imported on first use: the container child needs only install.py, and the spawner that
# forks it must not load the compiler, the profiles and the OCI spec structs.
_EXPORTS = {
    "compile_filter": "compiler", "DEFAULT_PROFILE": "default", "install_filter": "install",
    "filter_flags": "profile", "load_profile": "profile", "parse_profile": "profile",
    "parse_security_opts": "profile", "validate_profile": "profile",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
