"""`fcrun serve`'s process object without containers: a stop request ends it, a failed service
stops it and says so, and every task it owned is over afterwards. (tests/root/test_serve_root.py
runs the real thing.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from fcrun.paths import Paths
from fcrun.serve.config import load_config
from fcrun.serve.server import Serve, ServeFailed


def unstarted_serve(tmp_path) -> Serve:
    serve = Serve(load_config(None, Paths(data_root=str(tmp_path / "data"), run_root=str(tmp_path / "run"))))
    removed = []
    # Nothing was started, and the host's own bridge is none of this test's business.
    serve.runtime = SimpleNamespace(network=SimpleNamespace(remove_bridge_if_unused=lambda: removed.append(True)))
    serve.bridge_removals = removed
    return serve


def test_a_failed_service_stops_serve_which_then_fails_naming_it(tmp_path):
    async def main():
        serve = unstarted_serve(tmp_path)
        jobs = serve.tasks.scope("manager")
        waiting = jobs.spawn(asyncio.Event().wait(), name="a job")

        async def broken():
            await asyncio.sleep(0)
            raise RuntimeError("the ticker broke")

        serve.tasks.spawn_service(broken(), name="lifecycle ticker")
        with pytest.raises(ServeFailed, match="the ticker broke"):
            await serve.run_until_stopped()
        assert waiting.cancelled() and len(serve.tasks) == 0 and serve.tasks.closed
        assert serve.bridge_removals == [True]
    asyncio.run(main())


def test_a_stop_request_ends_serve_cleanly_and_a_second_stop_does_nothing(tmp_path):
    async def main():
        serve = unstarted_serve(tmp_path)
        serve.request_stop()  # what SIGTERM does: no task, only a flag
        await serve.run_until_stopped()
        await serve.stop()
        await serve.wait_closed()
        assert serve.tasks.failure is None and serve.bridge_removals == [True]
    asyncio.run(main())


def test_serve_raises_its_soft_descriptor_limit_for_max_connections():
    import resource

    from fcrun.serve.server import raise_descriptor_limit

    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        hard = before[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        soft = raise_descriptor_limit(1000)
        want = 2 * 1000 + 1024 if hard == resource.RLIM_INFINITY else min(2 * 1000 + 1024, hard)
        assert soft == want == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_descriptor_limit(10) == want  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
