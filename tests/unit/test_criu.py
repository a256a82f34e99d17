"""CRIU availability: asked once, answered with the reason (it fails on the reference VM)."""

from __future__ import annotations

import pytest

from fcrun.runtime import criu


@pytest.fixture
def criu_on_path(monkeypatch, tmp_path):
    """Put a fake `criu` (a shell script body, or None for none at all) alone on PATH; the cached
    answer is cleared before and after, so each test asks afresh and leaves nothing behind."""

    def install(script: str | None) -> None:
        if script is not None:
            fake = tmp_path / "criu"
            fake.write_text("#!/bin/sh\n" + script)
            fake.chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))

    criu.availability.cache_clear()
    yield install
    criu.availability.cache_clear()


def test_missing_criu_is_unavailable(criu_on_path):
    criu_on_path(None)
    assert criu.availability() == (False, "criu is not installed")


def test_a_failing_check_is_reported_with_its_last_line(criu_on_path):
    criu_on_path("echo 'Error (criu/vdso.c:613): vdso: Failed' >&2\necho 'Looks bad' >&2\nexit 1\n")
    usable, why = criu.availability()
    assert not usable and why == "criu check failed: Looks bad"


def test_a_passing_check_is_available(criu_on_path):
    criu_on_path("echo 'Looks good.'\n")
    assert criu.availability() == (True, "Looks good.")
