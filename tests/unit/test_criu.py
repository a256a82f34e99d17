"""CRIU availability: asked once, answered with the reason (it fails on the reference VM)."""

from __future__ import annotations

from fcrun.runtime import criu
def _fresh():
    criu.availability.cache_clear()


def test_missing_criu_is_unavailable(monkeypatch):
    _fresh()
    monkeypatch.setenv("PATH", "/nonexistent")
    assert criu.availability() == (False, "criu is not installed")
    _fresh()


def test_a_failing_check_is_reported_with_its_last_line(monkeypatch, tmp_path):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Error (criu/vdso.c:613): vdso: Failed' >&2\necho 'Looks bad' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    _fresh()
    usable, why = criu.availability()
    assert not usable and why == "criu check failed: Looks bad"
    _fresh()


def test_a_passing_check_is_available(monkeypatch, tmp_path):
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Looks good.'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    _fresh()
    assert criu.availability() == (True, "Looks good.")
    _fresh()
