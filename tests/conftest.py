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
