"""The flow tests' Prefect server: the production shape (PostgreSQL) when the machine has PostgreSQL.

Prefect's own test harness runs its server on SQLite. With the many flows these tests run at once
(releases beside their scale-down runs, fleets, park/wake under load) SQLite's single writer turns
into 503s (each one a client retry of 2–4 s) and, now and then, a request that hangs for 60 s with the
database locked (seen: `task_run_recorder` "database is locked", an artifact POST timing out). A
server on PostgreSQL is what the README tells users to run in production, so the suite runs on it;
without PostgreSQL it falls back to Prefect's SQLite harness (`LLM_FLEET_TEST_DB=sqlite` forces that).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from unittest import mock

from sandbox.core import free_port
from tests.flows.server_support import pg_bin, postgres_server, python, stop_process, wait_answering

# Server services whose output no test reads, off: together they cost more CPU than the flows (the
# task-run recorder alone was a quarter of the server's; the scheduler would make 100 runs per park/wake
# schedule). Kept: event persister (tests read events), triggers and actions (automations), pause
# expirations (the promotion gate), repossessor (a killed lock holder's lease), cancellation cleanup.
QUIET_SERVICES = ("TASK_RUN_RECORDER", "SCHEDULER", "LATE_RUNS", "FOREMAN", "DB_VACUUM", "CLEANUP_RECONCILER")
# No block types registered at startup: it imports every installed collection first (prefect_gcp pulls in
# google.cloud.aiplatform), 4 of the server's 9 CPU-seconds and 5 of its 13 s to start on this machine. A
# block saved by a test registers its own type and schema (`Block.save`), and loading a missing block is the
# same 404 either way. Both settings: the memoizing wrapper imports the collections before it reads the first.
# Events are persisted every 0.5 s, not 5 (or per 20): the tests that read events back (check_fleet, park,
# playground) poll until the persister has flushed; automations react to the stream, not the table.
NO_BLOCK_REGISTRATION = {"PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
                         "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}
QUIET_SETTINGS = {**NO_BLOCK_REGISTRATION, "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5"}


@contextlib.contextmanager
def prefect_test_server() -> Iterator[str]:
    """A Prefect server for this process's flows (PREFECT_API_URL set); yields which database it uses."""
    import prefect.settings
    import prefect.task_engine

    # No flow-run heartbeats in this process: Prefect's heartbeat thread sleeps in 1 s steps and every
    # flow run joins it on exit, so each of the suite's ~500 flow runs paid up to 1 s for it (measured
    # 0.97 s of a 1.1 s empty flow). Nothing in llm-fleet reads heartbeats; the demo keeps Prefect's default.
    with contextlib.ExitStack() as stack:
        stack.enter_context(prefect.settings.temporary_settings(
            updates={prefect.settings.PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))
        # No task-run state events from this process's task runs: their only reader on a server is the
        # task-run recorder, off here (QUIET_SERVICES), yet each was serialized, sent, persisted and matched
        # against every automation (~2,500 of a release module's ~2,650 events). Flow-run events and the
        # product's own events are sent as before. test_release_model: 71 -> 58 machine CPU-s (two runs each).
        stack.enter_context(mock.patch.object(prefect.task_engine, "emit_task_run_state_change_event",
                                              lambda *args, **kwargs: None))
        # Only a PostgreSQL that is installed: test_prefect_yaml.py is the one module that installs it.
        if os.environ.get("LLM_FLEET_TEST_DB", "postgres") == "postgres" and pg_bin() is not None:
            stack.enter_context(_harness_on(stack.enter_context(postgres_server())))
            yield "postgres"
        else:
            from prefect.testing.utilities import prefect_test_harness

            with _quiet_services():
                stack.enter_context(prefect_test_harness(server_startup_timeout=120))
            yield "sqlite"


@contextlib.contextmanager
def _quiet_services() -> Iterator[None]:
    """While the server subprocess starts (it takes its settings from the environment), not after: the
    demo tests start servers of their own that must run every service."""
    saved = dict(os.environ)
    os.environ.update({f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in QUIET_SERVICES})
    os.environ.update(QUIET_SETTINGS)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def _harness_on(database_url: str) -> Iterator[None]:
    """`prefect_test_harness` with the database URL as the only change (Prefect hard-codes SQLite there).

    The server subprocess is started as Prefect's ``SubprocessASGIServer`` starts it (same command, same
    environment), without importing that class: its module imports the whole server API and builds every
    route (FastAPI's dependency analysis), ~5 CPU-s in each pytest worker that never serves a request."""
    import prefect
    import prefect.context
    import prefect.settings

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    with _quiet_services():
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **prefect.settings.get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url}
    proc = subprocess.Popen([*python("-m", "uvicorn"), "--app-dir", str(prefect.__module_path__.parent),
                             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "error", "--lifespan", "on"], env=env)
    try:
        wait_answering(f"{api}/health", proc, timeout=120)
        with contextlib.ExitStack() as stack:
            stack.enter_context(prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: api}))
            stack.enter_context(prefect.context._temporary_global_settings_context(
                prefect.context.get_settings_context()))
            yield
            _drain()
    finally:
        stop_process(proc, timeout=5)


def _drain() -> None:
    """Flush logs and events before the server stops (what Prefect's harness does on exit)."""
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
