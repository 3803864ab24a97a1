"""The production shape: a Prefect server on a real PostgreSQL, and a product flow run through it.

PostgreSQL is Debian's `postgresql` package, started by this test as a non-root user under a temp dir
(installed with apt first when it is missing and apt is there; skipped, saying why, only without apt).
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.flows.server_support import ROOT, PostgresUnavailable, postgres_server, prefect_server

pytestmark = pytest.mark.timeout(300)  # a Prefect server migrates its schema into PostgreSQL first


@pytest.fixture(scope="module")
def postgres():
    try:
        with postgres_server() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


def test_prefect_server_on_postgres_runs_a_flow(postgres, tmp_path):
    with prefect_server(tmp_path / "home", PREFECT_API_DATABASE_CONNECTION_URL=postgres) as (api, env):
        # The server migrated its schema into PostgreSQL (not a SQLite file in PREFECT_HOME).
        assert not list((tmp_path / "home").glob("*.db"))
        code = ("from flows.deploy_fleet import deploy_fleet\n"
                "r = deploy_fleet(fleet='deployments/fleets/demo.yaml', dry_run=True)\n"
                "assert len(r['models']) == 3, r\n")
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        with httpx.Client(base_url=api, timeout=30) as http:
            runs = http.post("/flow_runs/filter", json={"limit": 10}).json()
            assert [r["state_type"] for r in runs] == ["COMPLETED"]
            arts = http.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["deploy-fleet-plan"]}}}).json()
            assert arts and arts[0]["flow_run_id"] == runs[0]["id"]
    # ...and the run is in PostgreSQL itself.
    import asyncio

    import asyncpg

    async def count() -> int:
        conn = await asyncpg.connect(postgres.replace("postgresql+asyncpg", "postgresql"))
        try:
            return await conn.fetchval("select count(*) from flow_run where state_type = 'COMPLETED'")
        finally:
            await conn.close()

    deadline = time.monotonic() + 10
    while asyncio.run(count()) != 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert asyncio.run(count()) == 1
