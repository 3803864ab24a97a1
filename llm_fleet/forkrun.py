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

The same pair serves any interpreter command whose imports are known up front: ``forkrun.py -u -c CODE``
or ``forkrun.py -m MODULE ARGS`` runs as ``python`` with those arguments would, in a process forked from
``serve NAME --packages PKG... --modules MODULE...`` (every module of those packages and those modules,
imported instead of the flows'; ``--later MODULE...`` once the waiting requests are forked). The test suite's
pytest-xdist workers are started that way (tests/conftest.py). On a clean checkout (no bytecode cached yet)
such a server starts a twin (``compile``) that imports the same modules last first, so that both cores compile
them while the workers wait.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterator

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

ENGINE = ["-m", "prefect.engine"]  # a flow run's command: the launcher's when it is given none


def launcher() -> list[str]:
    """The launcher's command (``python ARGS`` through the server: append ARGS; a flow run's: nothing)."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__)]


def _interpreter(argv: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, *argv])


def launch(argv: list[str]) -> None:
    """Run ``python ARGV`` (a flow run's engine when empty) in a process forked from the server, or exec it."""
    argv = argv or ENGINE
    name = os.environ.get(ENV)
    if not name or sys.platform != "linux" or _command(argv) is None:
        _interpreter(argv)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
    except OSError:
        sock.close()
        _interpreter(argv)
    request = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv": argv}).encode()
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
    for line in _lines(sock):
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
    if not child and not pending:  # the server ended before it forked (its imports failed): run it here
        sock.close()
        _interpreter(argv)
    print("llm_fleet.forkrun: the fork server went away before the flow run ended", file=sys.stderr)
    sys.exit(1)


def _lines(sock: socket.socket) -> Iterator[str]:
    """The server's lines, until it closes (or resets: it ended with this connection not yet accepted)."""
    with contextlib.suppress(ConnectionResetError):
        yield from sock.makefile("r")


def _command(argv: list[str]) -> tuple[bool, str, str, list[str]] | None:
    """``python ARGV`` as (unbuffered, "-m" or "-c", the module or the code, sys.argv[1:]); None for what
    only a new interpreter does (other options, a script)."""
    unbuffered = False
    for i, arg in enumerate(argv):
        if arg == "-u":
            unbuffered = True
        elif arg in ("-m", "-c") and i + 1 < len(argv):
            return unbuffered, arg, argv[i + 1], argv[i + 2:]
        else:
            return None
    return None


# ---- the server: imports once, forks a process per run ------------------------------------------------

def _preload(packages: list[str] | None = None, modules: list[str] | None = None) -> None:
    """Every module of ``packages``, and ``modules``; with neither, the flows' imports (every entrypoint in
    prefect.yaml and PRELOAD): a flow run's. Not what the packages' functions import on first use: those are
    the optional clients (prefect-gcp's block, Vertex AI's SDK: 1,643 modules, 11 of a clean clone's 23 s of
    imports here, before any worker could start); a process that needs one imports it itself."""
    import importlib

    if not packages and not modules:
        from pathlib import Path

        import yaml

        root = Path(__file__).resolve().parents[1]
        entrypoints = {d["entrypoint"].partition(":")[0] for d in
                       yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]}
        modules = [*PRELOAD, *sorted(e.removesuffix(".py").replace("/", ".") for e in entrypoints)]
    for package in packages or ():
        for module in _modules_of(package):
            importlib.import_module(module)
    for module in modules or ():
        importlib.import_module(module)


def _modules_of(package: str) -> list[str]:
    """Every module of ``package``, first to last; not a ``__main__`` (a package's command line runs when imported)."""
    import importlib
    import pkgutil

    path = importlib.import_module(package).__path__
    return [m.name for m in pkgutil.walk_packages(path, f"{package}.") if m.name.rpartition(".")[2] != "__main__"]


def _compile(packages: list[str], modules: list[str]) -> None:
    """The twin of a server's first imports on a clean checkout: the same modules, last first, so that two cores
    compile their bytecode, not one (3-4 of 10.5 s on this machine kind). It stops at the next module once its
    standard input closes (the server is done) and never ends mid-import (a half-written bytecode file)."""
    import importlib
    import threading

    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.buffer.read(), done.set()), daemon=True).start()

    def names():
        yield from reversed(modules)
        for package in reversed(packages):
            yield from reversed(_modules_of(package))

    with contextlib.suppress(Exception):  # the server imports the same, and says what fails
        for name in names():
            if done.is_set():
                return
            with contextlib.suppress(Exception):
                importlib.import_module(name)


def _cold(packages: list[str], modules: list[str]) -> bool:
    """Whether a top-level package the server imports first has no bytecode cached yet (a clean checkout)."""
    import importlib.util

    for top in {name.partition(".")[0] for name in (*packages, *modules)}:
        spec = importlib.util.find_spec(top)
        if spec is not None and spec.cached and not os.path.exists(spec.cached):
            return True
    return False


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
    """In the forked process: become what ``python ARGV`` would be (``-m prefect.engine`` for a flow run), with
    the launcher's environment, working directory and standard streams, then run it; never returns."""
    import atexit
    import io
    import runpy
    import tempfile
    import threading
    import traceback
    import types

    code: int | str | None = 1
    try:
        command = _command(request["argv"])
        if command is None:
            raise ValueError(f"not a command the fork server runs: {request['argv']!r}")
        unbuffered, kind, target, args = command
        for fd, std in zip(fds, (0, 1, 2), strict=True):
            os.dup2(fd, std)
            os.close(fd)
        if unbuffered:  # -u: what is written reaches the stream at once
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        tempfile.tempdir = None  # the run's TMPDIR, not the server's
        # What the server's imports read from the environment is read again from the run's (Prefect's settings and
        # logging, the product's settings), where they were imported: a server of other packages imports neither.
        if "prefect.context" in sys.modules:
            import prefect.context
            import prefect.logging.configuration

            prefect.context.refresh_global_settings_context()
            prefect.logging.configuration.setup_logging(incremental=False)
        if "tasks.settings" in sys.modules:
            sys.modules["tasks.settings"].get_settings.cache_clear()
        threading.Thread(target=_die_with_launcher, args=(conn,), daemon=True).start()
        try:
            if kind == "-m":
                sys.argv = [target, *args]  # runpy puts the module's file first
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.argv = ["-c", *args]
                main = sys.modules["__main__"] = types.ModuleType("__main__")
                exec(compile(target, "<string>", "exec"), main.__dict__)  # noqa: S102 - what `python -c` does
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


def serve(name: str, packages: list[str] | None = None, modules: list[str] | None = None,
          later: list[str] | None = None) -> None:
    """Fork a process per launcher's request, each with ``packages`` and ``modules`` imported; ``later`` are
    imported one by one while no request waits, after the first forks: a process forked before one of them is
    imported imports it itself if it needs it."""
    import importlib
    import selectors

    # Listening before the imports: a launcher that comes meanwhile waits for them, not for an interpreter's.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(16)
    twin = None
    if packages and not sys.dont_write_bytecode and _cold(packages, modules or []):
        import subprocess

        twin = subprocess.Popen([sys.executable, "-m", "llm_fleet.forkrun", "compile", "--packages", *packages,
                                 "--modules", *(modules or [])], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    _preload(packages, modules)
    # What the imports made is never garbage: out of the collector's sight, a forked process's collections
    # neither walk it nor write to its pages (which would copy them, page by page, into every process).
    gc.freeze()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    if twin is not None:
        twin.stdin.close()  # it stops at its next module: reaped when it has
        sel.register(os.pidfd_open(twin.pid), selectors.EVENT_READ, twin)
    runs: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    later = list(later or ())
    while True:
        ready = sel.select(timeout=0 if later else None)
        if not ready and later:
            module = later.pop(0)
            try:
                importlib.import_module(module)
            except Exception as exc:  # noqa: BLE001 - a child that needs it imports it, and fails there
                print(f"llm_fleet.forkrun: could not import {module}: {exc!r}", file=sys.stderr, flush=True)
            gc.freeze()
            continue
        for key, _ in ready:
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
                    for other_key in sel.get_map().values():  # the listener, the twin's and the runs' pidfds
                        if other_key.fileobj is not listener:
                            os.close(other_key.fd)
                    sel.close()
                    listener.close()
                    for _, other in runs.values():
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
            elif key.data is not None:  # the twin has stopped
                sel.unregister(key.fd)
                os.close(key.fd)
                key.data.wait()
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
    if sys.argv[1:2] in (["serve"], ["compile"]):
        import argparse

        imports = argparse.ArgumentParser(add_help=False)
        imports.add_argument("--packages", nargs="*", default=[], help="import every module of these")
        imports.add_argument("--modules", nargs="*", default=[], help="import these")
        parser = argparse.ArgumentParser(prog="python -m llm_fleet.forkrun")
        commands = parser.add_subparsers(dest="command", required=True)
        serving = commands.add_parser("serve", parents=[imports], help="fork a process per launcher's request")
        serving.add_argument("name", help="the abstract socket's name (the launchers' LLM_FLEET_FORKRUN)")
        serving.add_argument("--later", nargs="*", default=[], help="import these once serving, while no "
                             "request waits (what only the commands forked later need)")
        commands.add_parser("compile", parents=[imports], help="a server's twin on a clean checkout")
        args = parser.parse_args()
        if args.command == "serve":
            serve(args.name, args.packages, args.modules, args.later)
        else:
            _compile(args.packages, args.modules)
    else:
        launch(sys.argv[1:])
