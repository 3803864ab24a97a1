"""The demo worker's fork server (llm_fleet/forkrun.py) imports up front what a flow run imports on first
use: a run forked from it makes its Kubernetes, Hub and Slack clients without importing a module more."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.flows.conftest import ROOT

# Every Kubernetes API class the product names (k8s.CoreV1Api(api), client.CustomObjectsApi(api), ...).
API_CLASS = re.compile(r"\b(?:k8s|client)\.([A-Z]\w*Api)\(")


def api_classes_named() -> set[str]:
    return {m for folder in ("flows", "targets", "tasks", "servers", "llm_fleet")
            for path in (ROOT / folder).rglob("*.py") for m in API_CLASS.findall(path.read_text())}


def test_a_forked_run_makes_its_clients_without_importing_more():
    names = api_classes_named()
    assert {"CoreV1Api", "AppsV1Api"} <= names  # the regex still finds them
    probe = f"""
import json, sys
from llm_fleet import forkrun
forkrun._preload()
before = set(sys.modules)
import kubernetes.client as k8s
from tasks import clients
for name in {sorted(names)!r}:
    getattr(k8s, name)(k8s.ApiClient())
clients.hf_api(None)
clients._slack_client("xoxb-test", "http://127.0.0.1:9/api/")
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == [], f"imported on first use, not by the fork server: {imported[:20]}"


def test_this_test_worker_was_forked_from_the_suites_fork_server():
    """tests/conftest.py starts each pytest-xdist worker as a process forked from a server that imported the
    project's packages once: this worker's parent is that server, and what the server imported is frozen out
    of the garbage collector's sight (its collections would walk it, and copy its pages, in every worker)."""
    import gc
    import os
    from pathlib import Path

    import pytest

    if not os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("LLM_FLEET_TEST_FORK") == "0":
        pytest.skip("not an xdist worker of a fork server (LLM_FLEET_TEST_FORK=0, or no -n)")
    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    assert parent[1:4] == [b"-m", b"llm_fleet.forkrun", b"serve"] and b"--packages" in parent, parent
    assert gc.get_freeze_count() > 100_000


def test_a_process_forked_after_the_store_was_imported_draws_its_own_uids():
    """Object uids and generated names come from the store's own generator: a process forked from one that
    imported it (a test worker, the campaign's operations) draws its own, not its parent's next ones."""
    import os

    from sandbox.kube import store

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first uid, then gone
        os.write(write, store.new_uid().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        assert f.read() != store.new_uid()


def test_the_prefect_servers_and_clis_the_tests_start_are_forked_from_it_too():
    """``python()`` (tests/flows/server_support.py: the flow tests' Prefect server, ``prefect server start``,
    ``prefect deploy``) runs its command forked from the same server, with Prefect's server and CLI loaded (once
    the server has imported them: ``--later``, after forking the workers)."""
    import os
    import subprocess
    import time

    import pytest

    from tests.flows.server_support import python

    if not os.environ.get("LLM_FLEET_FORKRUN"):
        pytest.skip("no fork server for this run (LLM_FLEET_TEST_FORK=0, or no -n)")
    code = ("import os, sys; print(open(f'/proc/{os.getppid()}/cmdline').read().split(chr(0))[1:4],"
            " 'prefect.server.api.server' in sys.modules)")
    deadline = time.monotonic() + 60
    while True:
        done = subprocess.run(python("-c", code), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        if done.stdout.strip().endswith("True") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done.stdout.strip() == "['-m', 'llm_fleet.forkrun', 'serve'] True", done.stdout
