"""Root integration tests: the fixtures live in rootfixtures.py (tests/security uses them too)."""

from rootfixtures import apache_php, busybox, data_root, run_root, runtime  # noqa: F401
