"""A throwaway PostgreSQL on 127.0.0.1 for a local Prefect server: the demo's, and the flow tests'.

Prefect on SQLite has one writer. With a few flow runs at once (the demo's lifecycle beside the
scheduled fleet checks that fire together at :00) a write transaction can hold the database while
others wait out SQLite's 60 s busy timeout: the whole server stalls for a minute ("database is
locked", seen in the demo's gpu_report step: 68.8 s for a one-second flow). PostgreSQL, what the
README says to run in production, has no such stall. These helpers run the installed PostgreSQL
binaries on a fresh data dir with durability off (a throwaway) and remove it all afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX = "llm-fleet-pg-"  # every data dir's temp dir: only such a dir is ever removed by a record


def bin_dir() -> Path | None:
    """The installed PostgreSQL's bin dir (the newest of Debian's versions first), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def as_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the package's `postgres` user then."""
    return cmd if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *cmd]


def usable_under(parent: Path) -> bool:
    """Whether a server can live under ``parent``: as root it runs as `postgres`, which must be able to
    pass through every directory above its data dir (a private temp dir of root's would refuse it)."""
    if os.geteuid() != 0:
        return True
    path = parent.resolve()
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


@dataclass(frozen=True)
class DataDir:
    """A data dir made by initdb in a temp dir of its own, and the port its server is to listen on."""

    binaries: Path
    base: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://prefect@127.0.0.1:{self.port}/postgres"

    def server_options(self) -> list[str]:
        """Loopback only, on its own socket dir, durability off (a throwaway)."""
        return ["-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.base / "sock"), "-c", "fsync=off",
                "-c", "max_connections=200"]

    def server_command(self) -> list[str]:
        """The server in the foreground, for an owner that stops it, and that takes it along when it dies: the
        kernel sends it SIGKILL then (the parent-death signal), a SIGKILLed owner's included. Through setpriv,
        which sets that signal and execs the server in place (as root after switching to `postgres`, as the
        switch clears it; runuser would fork)."""
        cmd = [str(self.binaries / "postgres"), "-D", str(self.base / "data"), *self.server_options()]
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        if os.geteuid() != 0:
            return [setpriv, "--pdeathsig=SIGKILL", "--", *cmd] if os.path.exists(setpriv) else cmd
        return [setpriv, "--reuid=postgres", "--regid=postgres", "--init-groups", "--pdeathsig=SIGKILL", "--", *cmd]

    def record(self, path: Path) -> None:
        """Name this data dir in ``path``, for :func:`remove_recorded` after an owner killed before its cleanup."""
        path.write_text(f"{self.base}\n")

    def wait_ready(self, *, server: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
        """Until the server accepts connections (``server``: its process, which must not have exited)."""
        deadline = time.monotonic() + timeout
        ask = [str(self.binaries / "pg_isready"), "-q", "-U", "prefect", "-h", "127.0.0.1", "-p", str(self.port)]
        while subprocess.run(ask, capture_output=True, timeout=30).returncode != 0:
            if server is not None and server.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with {server.returncode} before it accepted connections")
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} did not accept connections within {timeout:.0f} s")
            time.sleep(0.1)

    def remove(self) -> None:
        """Stop a server still running on it (pg_ctl's immediate mode), then remove the dir."""
        if (self.base / "data" / "postmaster.pid").exists():
            subprocess.run(as_user([str(self.binaries / "pg_ctl"), "-D", str(self.base / "data"), "-m", "immediate",
                                    "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


def remove_recorded(path: Path) -> None:
    """Stop and remove the data dir :meth:`DataDir.record` named in ``path`` (nothing when there is none)."""
    with contextlib.suppress(OSError, ValueError):
        base = Path(path.read_text().split()[0])
        binaries = bin_dir()
        if base.name.startswith(PREFIX) and binaries is not None:
            DataDir(binaries, base, 0).remove()


def init(binaries: Path) -> DataDir:
    """initdb into a new temp dir, owned by `postgres` when root (see :func:`usable_under`)."""
    from sandbox.core import free_port  # outside the kernel's ephemeral range: nothing takes it meanwhile

    base = Path(tempfile.mkdtemp(prefix=PREFIX))
    (base / "sock").mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(base / "sock", "postgres")
        os.chmod(base, 0o755)
    res = subprocess.run(as_user([str(binaries / "initdb"), "-D", str(base / "data"), "-A", "trust", "-U", "prefect",
                                  "-E", "UTF8", "--no-sync"]), capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {res.stdout}{res.stderr}")
    return DataDir(binaries, base, free_port())


@contextlib.contextmanager
def local_postgres(binaries: Path) -> Iterator[str]:
    """A server for as long as the block runs; yields its SQLAlchemy URL. It runs in the foreground under
    this process (:meth:`DataDir.server_command`), so a process killed inside the block takes it along: a
    server that pg_ctl had put in the background outlived a SIGKILLed test session and kept running."""
    data = init(binaries)
    try:
        with open(data.base / "pg.log", "w") as log:
            server = subprocess.Popen(data.server_command(), stdout=log, stderr=subprocess.STDOUT)
            try:
                data.wait_ready(server=server, timeout=60)
                yield data.url
            finally:
                server.send_signal(signal.SIGINT)  # fast shutdown: nothing in a throwaway is worth a checkpoint
                try:
                    server.wait(15)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
    finally:
        data.remove()
