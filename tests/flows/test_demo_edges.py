"""Issue 13.8: the demo's rough edges, as a new user meets them — and apply's adoption of `default`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.flows.conftest import ROOT
from tests.flows.server_support import clean_env
from tests.sandbox.kube_support import process_gone


def test_a_missing_spec_is_refused_before_anything_starts(tmp_path):
    state = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "llm_fleet.cli", "demo", "--spec", "deployments/nope.yaml",
                          "--state-dir", str(state)], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert "✗" in res.stdout and "cannot read" in res.stdout and "nope.yaml" in res.stdout
    assert "Traceback" not in res.stdout + res.stderr
    assert not state.exists()  # nothing was started or written


def test_every_cli_option_has_help():
    import argparse

    from llm_fleet.cli import build_parser

    def parsers(p: argparse.ArgumentParser):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    missing = [f"{p.prog} {a.dest}" for p in parsers(build_parser()) for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and a.dest != "help" and not a.help]
    assert missing == []


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_stops_the_prefect_server_and_sandbox(tmp_path):
    """What `timeout 60 scripts/demo` does at the 60th second. Sent as soon as the Prefect server
    process exists (cheap: no waiting for it to answer); the worker is stopped by the same code."""
    state = tmp_path / "demo"
    proc = subprocess.Popen(["scripts/demo", "--state-dir", str(state), "--time-scale", "0.005"], cwd=ROOT,
                            # uv (scripts/bootstrap) leaves its lock file in the temp dir: the test's own
                            env={**clean_env(), "TMPDIR": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pidfile = state / "pids"
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and "prefect-server" in pidfile.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        pids = {name: int(pid) for name, pid in (ln.split() for ln in pidfile.read_text().splitlines())}
        server = pids["prefect-server"]
        assert not process_gone(server)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "✓ stopped: Prefect server, worker and sandbox" in out and "Traceback" not in out
    assert process_gone(server)
    sandbox_port = int(out.split("sandbox up: http://127.0.0.1:")[1].split()[0])
    assert not _port_open(sandbox_port)
    assert not pidfile.exists()
    assert "Prefect UI: http" not in out  # never an address of a server that is gone


def test_a_stop_signal_dropped_inside_a_finalizer_still_stops_the_demo():
    """Python runs a signal handler wherever the main thread is. Inside a finalizer (``__del__``, a weakref
    callback), the handler's SystemExit is printed ("Exception ignored") and dropped, and the demo ran on: a
    clean-clone run saw SIGTERM, right after the Prefect server started, leave it running past 60 s. The
    demo's next poll ends it."""
    script = textwrap.dedent("""
        import os, signal, socket, time
        from llm_fleet import demo
        signal.signal(signal.SIGTERM, demo._exit_on_signal)
        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler runs here, in the finalizer
        Finalized()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: every poll is refused
        demo._wait_http(f"http://127.0.0.1:{closed.getsockname()[1]}/health", 20)
        print("ran on")
    """)
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=60)
    assert "Exception ignored" in res.stderr, res.stderr  # the case itself: the handler's exit was dropped
    assert res.returncode == 128 + signal.SIGTERM, res.stdout + res.stderr
    assert "ran on" not in res.stdout and time.monotonic() - started < 15


# ---- apply: adopting what a fresh cluster already has is not drift -----------------------------------

@pytest.fixture
def kubeconfig(sandbox, tmp_path):
    config = yaml.safe_load(Path(sandbox.env()["KUBECONFIG"]).read_text())
    config["current-context"] = "sandbox"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.usefixtures("prefect_server")
def test_first_apply_into_an_existing_namespace_is_not_a_hand_edit(sandbox, kubeconfig):
    from kubernetes import client

    from tasks import k8s
    from tasks.clients import kube_client

    core = client.CoreV1Api(kube_client(kubeconfig))
    ns = f"fresh-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})  # what a fresh cluster has (like `default`)
    ours = {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "llm-fleet"}}}
    first = k8s.apply_object(kubeconfig=kubeconfig, obj=ours)
    assert first.action == "configured" and first.changed == []
    assert core.read_namespace(ns).metadata.labels["app.kubernetes.io/part-of"] == "llm-fleet"
    # The real `default` namespace, as deploy_model applies it into a fresh cluster.
    default = {"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "default", "labels": {"app.kubernetes.io/part-of": "llm-fleet"}}}
    assert k8s.apply_object(kubeconfig=kubeconfig, obj=default).changed == []
    # A hand edit of something the product applied is still reported (and reverted).
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": ns, "labels": {
        "app.kubernetes.io/managed-by": "llm-fleet"}}, "data": {"a": "1", "b": "2"}}
    assert k8s.apply_object(kubeconfig=kubeconfig, obj=cm).action == "created"
    core.patch_namespaced_config_map("c", ns, {"data": {"a": "by hand"}})
    again = k8s.apply_object(kubeconfig=kubeconfig, obj=cm)
    assert again.changed == ["data.a"]
    assert core.read_namespaced_config_map("c", ns).data == {"a": "1", "b": "2"}


def test_a_killed_demo_takes_its_prefect_server_along(tmp_path):
    """SIGKILL cannot be handled: the kernel stops the children (PR_SET_PDEATHSIG) instead, the PostgreSQL
    under the Prefect server among them (where PostgreSQL is installed); the next demo removes its data dir."""
    import shutil
    import tempfile

    from llm_fleet import localpg

    state = tmp_path / "demo"
    # a temp dir PostgreSQL's user can reach when we are root (tmp_path is private to root)
    tmp = Path(tempfile.mkdtemp(prefix="tests-demo-kill-", dir=os.environ["LLM_FLEET_TEST_TMPDIR"]))
    tmp.chmod(0o711)
    proc = subprocess.Popen([sys.executable, "-m", "llm_fleet.cli", "demo", "--state-dir", str(state)], cwd=ROOT,
                            env={**clean_env(), "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pidfile = state / "pids"
        deadline = time.monotonic() + 120
        while not (pidfile.exists() and "prefect-server" in pidfile.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        pids = {name: int(pid) for name, pid in (ln.split() for ln in pidfile.read_text().splitlines())}
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 30  # for all of them together
        left = [name for name, pid in pids.items() if not process_gone(pid, within=deadline - time.monotonic())]
        assert left == []  # the server and the fork server
        assert ("postgres" in pids) == (localpg.bin_dir() is not None)
        if "postgres" in pids:
            assert [p.name for p in tmp.iterdir() if p.name.startswith(localpg.PREFIX)]  # left by the SIGKILL
            localpg.remove_recorded(state / "postgres")  # what the next demo does first
            assert not [p.name for p in tmp.iterdir() if p.name.startswith(localpg.PREFIX)]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_killed_owner_of_a_local_postgres_takes_it_along():
    """The flow tests' PostgreSQL (``localpg.local_postgres``, under each worker's Prefect server) runs in the
    foreground under its owner: a worker or session killed with SIGKILL leaves no PostgreSQL running. (pg_ctl
    had started it in the background, and it outlived its owner.)"""
    import shutil
    import tempfile

    from llm_fleet import localpg

    if localpg.bin_dir() is None:
        pytest.skip("PostgreSQL is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="tests-pg-kill-", dir=os.environ["LLM_FLEET_TEST_TMPDIR"]))
    tmp.chmod(0o711)  # PostgreSQL's user passes through it when we are root
    code = ("import time\nfrom llm_fleet import localpg\n"
            "with localpg.local_postgres(localpg.bin_dir()) as url:\n    print(url, flush=True)\n    time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**clean_env(), "TMPDIR": str(tmp)},
                             stdout=subprocess.PIPE, text=True)
    try:
        assert "postgresql+asyncpg://" in owner.stdout.readline()  # type: ignore[union-attr]
        [pidfile] = tmp.glob(f"{localpg.PREFIX}*/data/postmaster.pid")
        postmaster = int(pidfile.read_text().split()[0])
        assert not process_gone(postmaster)
        owner.kill()
        owner.wait(30)
        assert process_gone(postmaster, within=30), f"PostgreSQL {postmaster} outlived its SIGKILLed owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        for pidfile in tmp.glob(f"{localpg.PREFIX}*/data/postmaster.pid"):  # the old code's daemon, if any
            localpg.DataDir(localpg.bin_dir(), pidfile.parents[1], 0).remove()  # type: ignore[arg-type]
        shutil.rmtree(tmp, ignore_errors=True)


def _until_up(out: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until the child writing to ``out`` has printed "up" (its signal handlers are set)."""
    deadline = time.monotonic() + timeout
    while "up" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)


def test_ctrl_c_stops_the_worker_while_its_server_still_answers(tmp_path):
    """The demo's children stop newest first, each waited for: the worker (started after the server) makes its
    last calls on the way out while the server still answers them. Asked to stop at once, Prefect's worker
    outlived its server and spent 8 s of the demo's Ctrl-C retrying its last events."""
    from llm_fleet import demo
    from sandbox.core import free_port

    port = free_port()
    children = demo.Children(tmp_path / "pids")
    server = children.start("server", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker_code = textwrap.dedent(f"""
        import signal, sys, time, urllib.request
        def last_calls(*_):
            time.sleep(0.3)  # what an exit flushes first
            try:
                urllib.request.urlopen("http://127.0.0.1:{port}/", timeout=5)
                print("answered", flush=True)
            except OSError as exc:
                print("gone", exc, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, last_calls)
        print("up", flush=True)
        while True:
            time.sleep(1)
    """)
    out = tmp_path / "worker.out"
    try:
        demo._wait_http(f"http://127.0.0.1:{port}/", 30, server)
        with out.open("w") as f:
            worker = children.start("worker", [sys.executable, "-c", worker_code], stdout=f)
        _until_up(out, worker)
    finally:
        children.stop(timeout=10)
    assert out.read_text().splitlines()[-1] == "answered", out.read_text()
    assert server.poll() is not None and worker.poll() is not None and not (tmp_path / "pids").exists()


def test_a_child_that_ignores_sigterm_is_killed_and_the_one_before_it_still_shuts_down(tmp_path):
    """A child that hangs on SIGTERM (newest, so asked first) is killed once the wait runs out; the one started
    before it is still asked and given its time (PostgreSQL's clean shutdown); nothing is left running."""
    from llm_fleet import demo

    children = demo.Children(tmp_path / "pids")
    out = tmp_path / "first.out"
    first_code = textwrap.dedent("""
        import signal, sys, time
        def bye(*_):
            time.sleep(0.5)  # a shutdown that takes a moment
            print("shut down", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("up", flush=True)
        while True:
            time.sleep(1)
    """)
    hung_code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(600)\n"
    hung_out = tmp_path / "hung.out"
    with out.open("w") as f, hung_out.open("w") as h:
        first = children.start("first", [sys.executable, "-c", first_code], stdout=f)
        hung = children.start("hung", [sys.executable, "-c", hung_code], stdout=h)
    try:
        _until_up(out, first)
        _until_up(hung_out, hung)
    finally:
        children.stop(timeout=1.0)
    assert hung.returncode == -signal.SIGKILL
    assert first.returncode == 0 and out.read_text().splitlines()[-1] == "shut down"
    assert not (tmp_path / "pids").exists()


def test_ctrl_c_handed_to_another_thread_still_stops_the_wait():
    """The kernel may deliver a process's SIGINT to any thread (the demo runs the sandbox's dozens): the demo's
    --keep-running wait must still end, even when the demo was started with SIGINT ignored and blocked.
    signal.pause() in the main thread never returned then (a CI run's demo stayed up 60 s after Ctrl-C, its
    main thread in pause(); here it would time out)."""
    code = (
        "import signal, threading, time\n"
        "from llm_fleet.demo import wait_for_ctrl_c\n"
        "def other():\n"
        "    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a thread that takes it\n"
        "    time.sleep(0.3)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # to this thread, not the main one\n"
        "    time.sleep(30)\n"
        "threading.Thread(target=other, daemon=True).start()\n"
        "wait_for_ctrl_c()\n"
        "print('stopped')\n"
    )
    # started as the suite's earlier tests may leave a worker: SIGINT ignored and blocked (the demo inherits
    # both from whoever starts it; a CI run's child got one of them and its Ctrl-C did nothing)
    def inherit_a_deaf_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=20,
                         preexec_fn=inherit_a_deaf_sigint)
    assert res.returncode == 0 and "stopped" in res.stdout, res.stderr[-2000:]


def test_a_postgresql_that_does_not_start_leaves_the_demo_on_sqlite(tmp_path, monkeypatch, capsys):
    """An installed PostgreSQL that fails (here: binaries that are not there) is said in one line and the demo
    goes on with SQLite; nothing of it is left in the temp dir."""
    import tempfile

    from llm_fleet import demo, localpg

    monkeypatch.setattr(localpg, "bin_dir", lambda: tmp_path / "no-such-postgresql")
    before = set(os.listdir(tempfile.gettempdir()))
    with contextlib.ExitStack() as cleanup:
        env = demo._prefect_database(demo.Children(tmp_path / "pids"), cleanup, tmp_path, subprocess.DEVNULL)
    assert env == {}
    out = capsys.readouterr().out
    assert "PostgreSQL did not start" in out and "the Prefect server uses SQLite" in out, out
    assert set(os.listdir(tempfile.gettempdir())) == before
