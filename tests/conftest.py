"""Shared test setup: root-only tests skip (with the reason) when not run as root."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: real namespaces, cgroups, overlayfs and veth")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


# Property-based tests (hypothesis): a bounded run by default (CI), a long one on demand with
# `FCRUN_FUZZ=long ./scripts/test.sh tests/fuzz` (or `--hypothesis-profile=long`).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis comes with the [test] extra; without it the fuzz tests skip
    pass
else:
    settings.register_profile("ci", max_examples=200, deadline=None, derandomize=False,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=20_000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("FCRUN_FUZZ", "ci"))
