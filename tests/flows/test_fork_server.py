"""The fork server and its launcher (llm_fleet/forkrun.py): the demo worker's flow runs, and any ``python -m``/``-c``
command (the test workers, the Prefect servers and CLIs the tests start), run forked from a server that imported
once; without one, a new interpreter."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from llm_fleet import forkrun
from tests.flows.conftest import ROOT
from tests.flows.server_support import clean_env

LAUNCHER = forkrun.launcher()


@contextlib.contextmanager
def _fork_server(*packages: str, options: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 ) -> Iterator[dict[str, str]]:
    """A fork server (``serve NAME [--packages ...] [OPTIONS]``) in ``env`` (default: the tests' without the
    product's settings), listening; yields the environment naming it."""
    name = f"llm-fleet-forkrun-test-{uuid.uuid4().hex[:8]}"
    env = {**(clean_env() if env is None else env), "LLM_FLEET_FORKRUN": name}
    server = subprocess.Popen([sys.executable, "-m", "llm_fleet.forkrun", "serve", name,
                               *(["--packages", *packages] if packages else []), *options], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120  # its imports: seconds on a loaded machine
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1][-2000:]
            with socket.socket(socket.AF_UNIX) as s:
                if s.connect_ex("\0" + name) == 0:
                    break
            time.sleep(0.1)
        yield env
    finally:
        server.terminate()
        server.wait(30)


def test_a_flow_run_launcher_is_forked_with_its_env_and_streams_and_execs_the_engine_without_the_server():
    """The launcher hands its environment and stderr to the fork server and exits as the forked
    ``prefect.engine`` did (a bad flow run id: its error line, exit 1); with no server it execs a new
    interpreter. PYTHONPROFILEIMPORTTIME tells them apart: only a new interpreter reads it and prints its
    imports — a forked run imports nothing more."""
    with _fork_server() as env:
        run_env = {**env, "PREFECT__FLOW_RUN_ID": "not-a-uuid", "PYTHONPROFILEIMPORTTIME": "1"}
        forked = subprocess.run(LAUNCHER, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=120)
    assert forked.returncode == 1 and "Invalid flow run id" in forked.stderr, forked.stderr[-2000:]
    assert "import time:" not in forked.stderr
    fresh = subprocess.run(LAUNCHER, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 1 and "Invalid flow run id" in fresh.stderr, fresh.stderr[-2000:]
    assert "import time:" in fresh.stderr


PROBE = """
import os, sys
line = sys.stdin.readline().strip()
sys.stdout.write(repr((sys.argv, line, os.environ["PROBE"], os.getcwd(), "manifests.render" in sys.modules,
                       "prefect" in sys.modules)))
sys.stderr.write("unbuffered")  # -u: no flush needed before the exit below
os._exit(3)
"""


def test_any_python_command_runs_forked_from_a_server_of_the_packages_it_imports(tmp_path):
    """``forkrun.py -u -c CODE ARGS`` (what pytest-xdist runs for each test worker, tests/conftest.py) and
    ``forkrun.py -m MODULE ARGS`` run as ``python`` with those arguments would: its argv, stdin, stdout and
    unbuffered stderr, environment, working directory and exit code, in a process forked from a server that
    imported ``--packages`` (already loaded when the code starts, and nothing a flow run needs besides: Prefect
    is not imported for a command whose server did not); with no server, in a new interpreter."""
    with _fork_server("manifests") as env:
        forked = subprocess.run([*LAUNCHER, "-u", "-c", PROBE, "a", "b"], cwd=tmp_path, env={**env, "PROBE": "x"},
                                input="hello\n", capture_output=True, text=True, timeout=120)
        module = subprocess.run([*LAUNCHER, "-m", "json.tool", "--compact"], cwd=tmp_path, env=env,
                                input='{"a": [1, 2]}', capture_output=True, text=True, timeout=120)
    assert forked.returncode == 3, forked.stderr[-2000:]
    assert forked.stdout == repr((["-c", "a", "b"], "hello", "x", str(tmp_path), True, False)), forked.stdout
    assert forked.stderr == "unbuffered"
    assert module.returncode == 0 and module.stdout.strip() == '{"a":[1,2]}', module.stderr[-2000:]
    fresh = subprocess.run([*LAUNCHER, "-u", "-c", PROBE], cwd=tmp_path, env={**clean_env(), "PROBE": "y"},
                           input="hi\n", capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 3 and fresh.stdout == repr((["-c"], "hi", "y", str(tmp_path), False, False)), fresh.stdout


def test_what_only_later_commands_need_is_imported_after_the_waiting_ones_are_forked():
    """``serve --later MODULE...``: the commands waiting for the server's imports (the test workers, at the start
    of a run) are forked once ``--modules`` are imported, not after ``--later`` too (Prefect's server and CLI, which
    only the Prefect servers and CLIs the tests start later need: 4 of a clean clone's 12 s of imports before the
    first worker could start); those are imported while no request waits, and the commands forked after have them."""
    probe = "import sys; print('prefect' in sys.modules, 'email.mime.text' in sys.modules)"
    with _fork_server(options=("--modules", "prefect", "--later", "email.mime.text")) as env:
        first = subprocess.run([*LAUNCHER, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=120)  # asked while the server imports Prefect (a second or more)
        assert first.returncode == 0 and first.stdout.split() == ["True", "False"], first.stdout + first.stderr
        deadline, later = time.monotonic() + 60, first
        while later.stdout.split() != ["True", "True"] and time.monotonic() < deadline:
            later = subprocess.run([*LAUNCHER, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=120)
        assert later.stdout.split() == ["True", "True"], later.stdout + later.stderr


def test_on_a_clean_checkout_a_twin_compiles_the_servers_imports_from_the_other_end(tmp_path):
    """A server of ``--packages`` whose bytecode is not cached yet (a clean clone: 10.5 s of imports on one core,
    the other idle) starts a twin that imports the same modules last first, so both cores compile; the twin stops
    once the server has its imports and is reaped (no zombie). With the bytecode cached, no twin."""
    package = tmp_path / "twinpkg"
    package.mkdir()
    log = tmp_path / "imports.log"
    record = f"import os\nwith open({str(log)!r}, 'a') as f:\n    f.write(f'{{__name__}} {{os.getpid()}}\\n')\n"
    (package / "__init__.py").write_text(record)
    for i in range(40):
        (package / f"m{i:02d}.py").write_text(record + "import time\ntime.sleep(0.05)\n")  # 2 s: the twin starts in them
    env = {**{k: v for k, v in clean_env().items() if k != "PYTHONDONTWRITEBYTECODE"}, "PYTHONPATH": str(tmp_path)}
    probe = "import os; print(os.getppid())"
    for cold in (True, False):
        log.write_text("")
        with _fork_server("twinpkg", env=env) as server_env:
            forked = subprocess.run([*LAUNCHER, "-c", probe], cwd=ROOT, env=server_env, capture_output=True,
                                    text=True, timeout=120)
            assert forked.returncode == 0, forked.stderr[-2000:]
            server = int(forked.stdout)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{server}/task/{server}/children").read_text().split() and time.monotonic() < deadline:
                time.sleep(0.05)  # the twin reaped (the probe's process is gone)
            assert Path(f"/proc/{server}/task/{server}/children").read_text().split() == []
        lines = [line.split() for line in log.read_text().splitlines()]
        by = {pid for _, pid in lines}
        twin = {pid for name, pid in lines if name == "twinpkg.m39"} - {str(server)}
        if cold:
            assert len(by) == 2 and twin, lines  # the server and its twin, which began at the other end
            assert [name for name, pid in lines if pid in twin][:2] == ["twinpkg", "twinpkg.m39"], lines
        else:
            assert by == {str(server)}, lines


def test_a_fork_server_whose_imports_fail_leaves_the_command_to_a_new_interpreter(tmp_path):
    """A server that cannot import what it was asked to (here a module that does not exist) ends; a launcher
    that connected while it imported, or comes after, runs the command itself, as ``python`` would."""
    name = f"llm-fleet-forkrun-test-{uuid.uuid4().hex[:8]}"
    env = {**clean_env(), "LLM_FLEET_FORKRUN": name}
    server = subprocess.Popen([sys.executable, "-m", "llm_fleet.forkrun", "serve", name, "--modules",
                               "llm_fleet.no_such_module"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        done = subprocess.run([*LAUNCHER, "-c", "import sys; print('ran', sys.argv)", "x"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert server.wait(120) != 0 and "no_such_module" in server.stderr.read()  # type: ignore[union-attr]
    finally:
        server.kill()
        server.wait()
        server.stderr.close()  # type: ignore[union-attr]
    assert done.returncode == 0 and done.stdout == "ran ['-c', 'x']\n", done.stderr[-2000:]
