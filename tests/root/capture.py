"""Running a container to completion with its output captured, for the root tests."""

from __future__ import annotations

import os


def run_captured(rt, name: str, spec, **run_kwargs) -> tuple[int, str]:
    """`rt.run(name, spec, **run_kwargs)` with stdin /dev/null and stdout+stderr into a pipe,
    read to EOF; returns (exit code, output). The container is deleted afterwards."""
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        container = rt.run(name, spec, stdio=(null, w, w), **run_kwargs)
    finally:
        os.close(w)
        os.close(null)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    code = container.wait()
    rt.delete(name)
    return code, b"".join(chunks).decode()
