"""Seccomp for containers: OCI profiles (profile.py), the default every container gets
(default.py), compiling with libseccomp in the parent (compiler.py, libseccomp.py), and
loading the result in the child just before execve (install.py).
"""

from .compiler import compile_filter
from .default import DEFAULT_PROFILE
from .install import install_filter
from .profile import filter_flags, load_profile, parse_profile, parse_security_opts, validate_profile

__all__ = [
    "DEFAULT_PROFILE", "compile_filter", "filter_flags", "install_filter", "load_profile",
    "parse_profile", "parse_security_opts", "validate_profile",
]
