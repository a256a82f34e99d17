"""What a wheel of fcrun holds: every package of the source tree (the device host and any
non-editable install run from the wheel, where a package left out of pyproject.toml is missing)."""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _source_packages() -> set[str]:
    found = set()
    for top, name in ((ROOT / "src", None), (ROOT / "cli", "fcrun_cli")):
        for init in top.rglob("__init__.py"):
            parts = init.parent.relative_to(top).parts
            if name is not None:
                parts = (name, *parts)
            found.add(".".join(parts))
    return found


def test_pyproject_lists_every_package_of_the_source_tree():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert _source_packages() - listed == set()
    assert listed - _source_packages() == set()
