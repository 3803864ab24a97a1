"""A real `prefect server start` in a subprocess (fresh PREFECT_HOME), for tests of what deploys to it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from llm_fleet import localpg
from llm_fleet.demo import one_certificate_ca
from sandbox.core import free_port

ROOT = Path(__file__).resolve().parents[2]


def python(*args: str) -> list[str]:
    """``python ARGS`` for a subprocess: forked from the test workers' fork server when it runs (its name in the
    environment, tests/conftest.py), which imported Prefect's server and CLI once; a new interpreter otherwise."""
    from llm_fleet import forkrun

    return [*(forkrun.launcher() if os.environ.get(forkrun.ENV) else [sys.executable]), *args]


def clean_env() -> dict[str, str]:
    """The tests' environment without the product's settings: what a new user's shell has."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LLM_FLEET_", "HF_", "SLACK_"))}


def prefect_env(home: Path, api: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
                "PREFECT_API_SSL_CERT_FILE": one_certificate_ca(home / "api-ca.pem")})  # llm_fleet/demo.py
    if api:
        env["PREFECT_API_URL"] = api
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen, *, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` s; reaped either way (no zombie, no ResourceWarning)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_answering(url: str, proc: subprocess.Popen, *, timeout: float, log: Path | None = None) -> None:
    """Until ``url`` (a server's health check) answers 200; the server process's exit or the timeout raises,
    with its log when there is one."""
    def tail() -> str:
        return log.read_text() if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited {proc.returncode} before {url} answered:\n{tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:g} s:\n{tail()}")
            time.sleep(0.1)


@contextlib.contextmanager
def prefect_server(home: Path, *, timeout: float = 150, **extra_env: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Yields (api url, env for CLI subprocesses talking to it)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = prefect_env(home, **extra_env)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*python("-m", "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-services"], cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        wait_answering(f"{api}/health", proc, timeout=timeout, log=home / "server.log")
        yield api, {**env, "PREFECT_API_URL": api}
    finally:
        stop_process(proc, timeout=15)
        log.close()


def prefect_cli(*args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 300) -> str:
    res = subprocess.run([*python("-m", "prefect"), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


# ---- PostgreSQL (Debian's package), for a Prefect server in its production shape ------------------

class PostgresUnavailable(RuntimeError):
    """Not installed, and apt-get is not there to install it."""


def pg_bin() -> Path | None:
    return localpg.bin_dir()


def ensure_postgres() -> Path:
    """The PostgreSQL bin dir; `apt-get install postgresql` first when it is missing and apt is there."""
    import shutil

    bin_dir = pg_bin()
    if bin_dir is None:
        if shutil.which("apt-get") is None:
            raise PostgresUnavailable("PostgreSQL is not installed and apt-get is not available to install it")
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "postgresql"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        bin_dir = pg_bin()
        if bin_dir is None:
            raise PostgresUnavailable("apt-get installed postgresql but initdb is not there")
    return bin_dir


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL on 127.0.0.1 (installed first when missing); yields its SQLAlchemy asyncpg URL."""
    with localpg.local_postgres(ensure_postgres()) as url:
        yield url
