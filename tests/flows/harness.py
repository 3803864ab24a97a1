"""The flow tests' Prefect server: the production shape (PostgreSQL) when the machine has PostgreSQL.

Prefect's own test harness runs its server on SQLite. With the many flows these tests run at once
(releases beside their scale-down runs, fleets, park/wake under load) SQLite's single writer turns
into 503s (each one a client retry of 2–4 s) and, now and then, a request that hangs for 60 s with the
database locked (seen: `task_run_recorder` "database is locked", an artifact POST timing out). A
server on PostgreSQL is what the README tells users to run in production, so the suite runs on it;
without PostgreSQL it falls back to Prefect's SQLite harness.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from tests.flows.server_support import PostgresUnavailable, postgres_server


@contextlib.contextmanager
def prefect_test_server() -> Iterator[str]:
    """A Prefect server for this process's flows (PREFECT_API_URL set); yields which database it uses."""
    import prefect.settings

    # No flow-run heartbeats in this process: Prefect's heartbeat thread sleeps in 1 s steps and every
    # flow run joins it on exit, so each of the suite's ~500 flow runs paid up to 1 s for it (measured
    # 0.97 s of a 1.1 s empty flow). Nothing in llm-fleet reads heartbeats; the demo keeps Prefect's default.
    with (prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
          _server() as db):
        yield db


@contextlib.contextmanager
def _server() -> Iterator[str]:
    from prefect.testing.utilities import prefect_test_harness

    if os.environ.get("LLM_FLEET_TEST_DB", "postgres") != "postgres":
        with prefect_test_harness(server_startup_timeout=120):
            yield "sqlite"
        return
    try:
        pg = postgres_server()
        url = pg.__enter__()
    except PostgresUnavailable:
        with prefect_test_harness(server_startup_timeout=120):
            yield "sqlite"
        return
    try:
        with _harness_on(url):
            yield "postgres"
    finally:
        pg.__exit__(None, None, None)


@contextlib.contextmanager
def _harness_on(database_url: str) -> Iterator[None]:
    """`prefect_test_harness` with the database URL as the only change (Prefect hard-codes SQLite there)."""
    import prefect.context
    import prefect.settings
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.server.database.dependencies import temporary_database_interface
    from prefect.testing.utilities import _find_available_port

    with contextlib.ExitStack() as stack:
        stack.enter_context(temporary_database_interface())
        stack.enter_context(prefect.settings.temporary_settings(
            updates={prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL: database_url}))
        server = SubprocessASGIServer(port=_find_available_port())
        prior = SubprocessASGIServer._instances.get(None)
        SubprocessASGIServer._instances[None] = server
        server.start(timeout=120)
        try:
            stack.enter_context(prefect.settings.temporary_settings(
                updates={prefect.settings.PREFECT_API_URL: server.api_url}))
            stack.enter_context(prefect.context._temporary_global_settings_context(
                prefect.context.get_settings_context()))
            yield
            _drain()
        finally:
            server.stop()
            if prior is not None:
                SubprocessASGIServer._instances[None] = prior
            else:
                SubprocessASGIServer._instances.pop(None, None)


def _drain() -> None:
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())
