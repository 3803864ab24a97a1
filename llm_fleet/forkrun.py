"""The demo worker's flow runs, each still a process of its own, without paying Prefect's imports each time.

Prefect's process worker starts every flow run as a new interpreter (``python -m prefect.engine``) that
imports Prefect, the flows and the cloud clients again: seconds of CPU per run, most of a short run's
wall time on a loaded machine. The demo sets its pool's command to this file instead (the *launcher*):
it hands its environment, working directory and stdin/stdout/stderr to a fork server that imported all
of that once, which forks a process that runs ``prefect.engine``'s main as the interpreter would, with
exactly that environment. The launcher stays the worker's child for the run's life: it forwards
SIGTERM/SIGINT/SIGHUP to the run, and exits as the run did (same code, or the same signal); a run whose
launcher is killed (SIGKILL) is killed with it. Without the fork server (no ``LLM_FLEET_FORKRUN``, or it
does not answer) the launcher execs ``python -m prefect.engine`` itself: the worker's default.

The launcher runs as ``python -I -S forkrun.py`` and imports nothing but the standard library; the
server side (``python -m llm_fleet.forkrun serve NAME``) imports Prefect in :func:`serve` only. The
socket is in Linux's abstract namespace (no file to leave behind) and the server accepts connections
from its own user only (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys

ENV = "LLM_FLEET_FORKRUN"  # the abstract socket's name, in the worker's (so every run's) environment
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What the flows' steps import the first time a run uses them, though their modules are loaded: the
# Kubernetes client's API classes (its package exports them lazily, and CoreV1Api's first use imports ~200
# model modules), the Hub's and Slack's clients (tasks/clients.py imports them where it makes them). Unloaded,
# they were a quarter of the demo's flow runs' CPU (py-spy, the README's by-hand steps).
# tests/unit/test_forkrun.py checks that a run makes its clients without importing anything more.
FIRST_USE = ("kubernetes.client.api.core_v1_api", "kubernetes.client.api.apps_v1_api",
             "kubernetes.client.api.custom_objects_api", "kubernetes.client.api.coordination_v1_api",
             "huggingface_hub.hf_api", "slack_sdk", "slack_sdk.http_retry.builtin_handlers")
# Imported once by the server besides every entrypoint in prefect.yaml: what the flows import lazily,
# inside their steps (a profile of one release op had 65 % of its CPU in imports, bench/campaign.py).
PRELOAD = ("prefect.engine", "prefect.flow_engine", "prefect.deployments.steps",
           "google.cloud.container_v1", "kubernetes.client", "tasks.settings", *FIRST_USE)


# ---- the launcher: the worker's command for one flow run (standard library only) ------------------------

def _engine() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])


def launch() -> None:
    name = os.environ.get(ENV)
    if not name or sys.platform != "linux":
        _engine()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        _engine()
    request = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:]}).encode()
    socket.send_fds(sock, [struct.pack("!I", len(request))], [0, 1, 2])
    sock.sendall(request)
    pending: list[int] = []
    child = 0

    def forward(signum: int, _frame: object) -> None:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)
        else:
            pending.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    reader = sock.makefile("r")
    for line in reader:
        word, _, value = line.partition(" ")
        if word == "pid":
            child = int(value)
            for signum in pending:
                forward(signum, None)
        elif word == "exit":
            status = int(value)
            if os.WIFSIGNALED(status):  # end as the run ended: killed by the same signal
                sig = os.WTERMSIG(status)
                signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)
            sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
    print("llm_fleet.forkrun: the fork server went away before the flow run ended", file=sys.stderr)
    sys.exit(1)


# ---- the server: imports once, forks a process per run ------------------------------------------------

def _preload() -> None:
    import importlib
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    entrypoints = {d["entrypoint"].partition(":")[0] for d in
                   yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]}
    for module in [*PRELOAD, *sorted(e.removesuffix(".py").replace("/", ".") for e in entrypoints)]:
        importlib.import_module(module)


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 4, 3)
    while len(head) < 4:
        more = conn.recv(4 - len(head))
        if not more:
            raise ConnectionError("the launcher closed before its request")
        head += more
    size, body = struct.unpack("!I", head)[0], b""
    while len(body) < size:
        more = conn.recv(size - len(body))
        if not more:
            raise ConnectionError("the launcher closed mid-request")
        body += more
    if len(fds) != 3:
        raise ConnectionError(f"the launcher sent {len(fds)} descriptors, not stdin/stdout/stderr")
    return json.loads(body), fds


def _die_with_launcher(conn: socket.socket) -> None:
    """The run's side of the connection reads EOF when its launcher is gone (killed): the run goes too."""
    while conn.recv(64):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _run(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked process: become what ``python -m prefect.engine`` would be, with the launcher's
    environment, working directory and standard streams, then run the engine's main; never returns."""
    import atexit
    import runpy
    import threading
    import traceback

    code: int | str | None = 1
    try:
        for fd, std in zip(fds, (0, 1, 2), strict=True):
            os.dup2(fd, std)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import prefect.context
        import prefect.engine
        import prefect.logging.configuration

        import tasks.settings

        # What was read from the environment at import is read again from the run's (settings, logging).
        prefect.context.refresh_global_settings_context()
        prefect.logging.configuration.setup_logging(incremental=False)
        tasks.settings.get_settings.cache_clear()
        threading.Thread(target=_die_with_launcher, args=(conn,), daemon=True).start()
        sys.argv = [prefect.engine.__file__, *request["argv"]]
        try:
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code
        # As the interpreter ends: non-daemon threads joined, atexit (Prefect's log and event workers
        # flush to the API there), streams flushed.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - the run's process ends here whatever happened
        traceback.print_exc()
        code = 1
    finally:
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
                stream.flush()
        os._exit(code or 0)


def serve(name: str) -> None:
    import selectors

    _preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    runs: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                conn, _ = listener.accept()
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
                try:
                    if uid != os.getuid():
                        raise ConnectionError(f"uid {uid} is not this server's")
                    request, fds = _recv_request(conn)
                except (OSError, ValueError) as exc:
                    print(f"llm_fleet.forkrun: refused a request: {exc}", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    listener.close()
                    for other_fd, (_, other) in runs.items():
                        os.close(other_fd)
                        other.close()
                    for sig in FORWARDED:
                        signal.signal(sig, signal.SIG_DFL)
                    _run(conn, request, fds)
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"pid {pid}\n".encode())
                pidfd = os.pidfd_open(pid)
                runs[pidfd] = (pid, conn)
                sel.register(pidfd, selectors.EVENT_READ)
            else:
                pidfd = key.fd
                pid, conn = runs.pop(pidfd)
                sel.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):  # its launcher is gone
                    conn.sendall(f"exit {status}\n".encode())
                conn.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    else:
        launch()
