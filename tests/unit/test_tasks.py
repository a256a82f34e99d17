"""serve's one task owner (fcrun.tasks): jobs and services, scopes, failures, closing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fcrun.tasks import TaskOwner


class Boom(Exception):
    pass


async def fail(exc: BaseException) -> None:
    await asyncio.sleep(0)
    raise exc


def run(coro):
    return asyncio.run(coro)


def test_a_failed_job_is_logged_and_serve_goes_on(caplog):
    async def main():
        failures = []
        owner = TaskOwner("serve", on_failure=failures.append)
        task = owner.spawn(fail(Boom("broken")), name="stop web-1")
        await owner.join()
        assert task.done() and len(owner) == 0
        assert failures == [] and owner.failure is None
    with caplog.at_level(logging.ERROR, "fcrun.tasks"):
        run(main())
    [record] = caplog.records
    assert "serve: task stop web-1 failed" in record.getMessage() and isinstance(record.exc_info[1], Boom)


def test_an_expected_failure_is_left_to_whoever_awaits_the_job(caplog):
    async def main():
        owner = TaskOwner()
        task = owner.spawn(fail(Boom("no image")), name="start", expected=(Boom,))
        with pytest.raises(Boom):
            await task
    with caplog.at_level(logging.DEBUG, "fcrun.tasks"):
        run(main())
    assert caplog.records == []


def test_a_failed_service_in_a_scope_reaches_the_roots_on_failure(caplog):
    async def main():
        failures = []
        root = TaskOwner("serve", on_failure=failures.append)
        manager = root.scope("manager")
        manager.spawn_service(fail(Boom("monitor broke")), name="monitor")
        await root.join()
        assert [str(f) for f in failures] == ["monitor broke"] and str(root.failure) == "monitor broke"
        manager.spawn_service(asyncio.sleep(0), name="ends normally")
        await root.join()
        assert len(failures) == 1  # ending without an exception is no failure
    with caplog.at_level(logging.ERROR, "fcrun.tasks"):
        run(main())
    assert ["serve/manager: service monitor failed; serve stops"] == [r.getMessage() for r in caplog.records]


def test_aclose_cancels_and_awaits_every_task_of_every_scope_and_cancels_late_ones():
    async def main():
        root = TaskOwner()
        proxy, admin = root.scope("proxy"), root.scope("admin")
        ended = []

        async def forever(name):
            try:
                await asyncio.Event().wait()
            finally:
                ended.append(name)

        root.spawn(forever("root"))
        proxy.spawn(forever("proxy"))
        admin.spawn_service(forever("admin"), name="admin")
        await asyncio.sleep(0)
        assert len(root) == 3
        await proxy.aclose()  # a part closes its own scope first
        assert ended == ["proxy"] and len(root) == 2 and proxy.closed and not root.closed
        await root.aclose()
        assert sorted(ended) == ["admin", "proxy", "root"] and len(root) == 0
        assert root.failure is None  # cancelled is not failed
        for owner in (root, admin):
            late = owner.spawn(forever("late"))
            await asyncio.wait({late})
            assert late.cancelled() and "late" not in ended  # its body never ran
        with pytest.raises(RuntimeError, match="is closed"):
            root.scope("another")
    run(main())


def test_join_waits_for_jobs_started_meanwhile():
    async def main():
        owner = TaskOwner()
        done = []

        async def second():
            await asyncio.sleep(0)
            done.append("second")

        async def first():
            await asyncio.sleep(0)
            owner.spawn(second())
            done.append("first")

        owner.spawn(first())
        await owner.join()
        assert done == ["first", "second"]
    run(main())


def test_join_and_aclose_return_when_a_task_has_ended_but_its_callback_has_not_run():
    # The task's one step runs before main resumes from sleep(0); the owner's done callback is
    # then queued behind main's own step. Since Python 3.12, gather() of ended tasks is done at
    # once without yielding: a join/aclose that gathered them again would spin for ever.
    async def main(close: bool):
        owner = TaskOwner()
        task = owner.spawn(asyncio.sleep(0, "ended"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.done() and len(owner) == 1   # ended, not yet seen by its owner
        await (owner.aclose() if close else owner.join())
        assert len(owner) == 0 and task.result() == "ended"
    for close in (False, True):
        run(asyncio.wait_for(main(close), 10))
