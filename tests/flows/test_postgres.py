"""The production shape: a Prefect server on a real PostgreSQL, and a product flow run through it.

PostgreSQL is Debian's `postgresql` package, started by this test as a non-root user under a temp dir
(installed with apt first when it is missing and apt is there; skipped, saying why, only without apt).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.flows.server_support import ROOT, free_port, prefect_server


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _ensure_postgres() -> Path:
    bin_dir = _pg_bin()
    if bin_dir is None:
        if shutil.which("apt-get") is None:
            pytest.skip("PostgreSQL is not installed and apt-get is not available to install it")
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "postgresql"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        bin_dir = _pg_bin()
        assert bin_dir is not None, "apt-get installed postgresql but initdb is not there"
    return bin_dir


def _as_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the package's `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    import tempfile

    bin_dir = _ensure_postgres()
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="llm-fleet-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        os.chmod(base, 0o755)
    res = subprocess.run(_as_user([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "prefect",
                                   "-E", "UTF8", "--no-sync"]), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    port = free_port()
    subprocess.run(_as_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "pg.log"), "-w", "-t", "60",
                             "-o", f"-p {port} -h 127.0.0.1 -k {sock} -c fsync=off", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


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
