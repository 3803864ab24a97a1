"""Test-wide settings: fast retries and polls, and a fresh kubectl cache. Set before any task import."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
# Prefect's console handler without its highlighter: the tests' console is pytest's capture, never a terminal, and
# rich ran its regexes over every task run's "Finished in state" line (236 -> 91 us of CPU per record).
os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")
# Retries and operation polls in tests: same code paths, millisecond delays.
os.environ.setdefault("LLM_FLEET_RETRY_INITIAL_S", "0.01")
os.environ.setdefault("LLM_FLEET_RETRY_MAX_S", "0.05")
os.environ.setdefault("LLM_FLEET_RETRY_DEADLINE_S", "10")
os.environ.setdefault("LLM_FLEET_POLL_INITIAL_S", "0.01")
os.environ.setdefault("LLM_FLEET_POLL_MAX_S", "0.05")
os.environ.setdefault("LLM_FLEET_OPERATION_TIMEOUT_S", "60")
os.environ.setdefault("LLM_FLEET_MIN_LOAD_TIMEOUT_S", "10")

# One temp dir per test session, for this process and every one it starts (TMPDIR: xdist workers, the
# sandbox, Prefect, kubectl): pytest_sessionfinish asserts the suite left nothing in it, and sessions run
# side by side on one machine never see each other's files. The product's credentials directory is in
# it too (LLM_FLEET_KUBE_DIR, unless a test sets its own), not the user's home.
if "LLM_FLEET_TEST_TMPDIR" not in os.environ:
    import glob
    import shutil
    import tempfile

    for stale in glob.glob(os.path.join(tempfile.gettempdir(), "llm-fleet-tests-*", "tests-session.pid")):
        try:  # a session killed before its end (SIGKILL, a timeout) could not remove its dir: this one does
            with open(stale) as f:
                os.kill(int(f.read()), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(os.path.dirname(stale), ignore_errors=True)
        except OSError:
            pass
    os.environ["LLM_FLEET_TEST_TMPDIR"] = tempfile.mkdtemp(prefix="llm-fleet-tests-")
    with open(os.path.join(os.environ["LLM_FLEET_TEST_TMPDIR"], "tests-session.pid"), "w") as f:
        f.write(str(os.getpid()))
    os.environ["LLM_FLEET_TEST_TMPDIR_OWNER"] = str(os.getpid())  # only this process checks and removes it
    os.chmod(os.environ["LLM_FLEET_TEST_TMPDIR"], 0o711)  # the PostgreSQL harness runs as postgres inside it
    os.environ["TMPDIR"] = os.environ["LLM_FLEET_TEST_TMPDIR"]
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    os.environ.setdefault("LLM_FLEET_KUBE_DIR", os.path.join(os.environ["TMPDIR"], "kube"))


# What may stay in it until the session removes it: pytest's own base temp (tmp_path), files a test helper
# keeps for the whole session (named tests-*), and the credentials directory given to the product.
SESSION_OWNED = ("pytest-of-", "tests-", "kube")


def _share_httpx_ssl_contexts() -> None:
    """httpx parses certifi's roots into a new SSL context for every Client it makes, and one more per proxy
    mount (the sandbox sets HTTPS_PROXY): 25-40 ms of CPU here. The tests' one-off ``httpx.get`` calls,
    their polling loops and Prefect's client per flow run made thousands, 7 % of the workers' CPU. In the
    test processes, Clients with the default verification share one context per CA source; a context is
    safe to share across threads, and nothing here asks for HTTP/2 (the one setting httpcore writes into it).
    """
    import functools

    import httpx._transports.default as transports

    make = transports.create_ssl_context

    @functools.lru_cache(maxsize=8)
    def shared(trust_env: bool, cafile: str | None, capath: str | None):
        return make(verify=True, cert=None, trust_env=trust_env)

    def create_ssl_context(verify=True, cert=None, trust_env=True):
        if verify is True and cert is None:
            return shared(trust_env, os.environ.get("SSL_CERT_FILE") if trust_env else None,
                          os.environ.get("SSL_CERT_DIR") if trust_env else None)
        return make(verify=verify, cert=cert, trust_env=trust_env)

    transports.create_ssl_context = create_ssl_context


def _share_prefect_ssl_contexts() -> None:
    """Prefect's clients make their own context from certifi's roots (``ssl.create_default_context(cafile=)``)
    for every client: per flow run, its sync and async clients, ~30 ms of CPU each, 40 % of an empty flow
    run's CPU in the test process. In the test processes, that call (a verify-only context from one CA file)
    gets one shared context per file; every other use of ``ssl`` there is the module itself."""
    import functools
    import ssl
    import types

    import prefect.client.orchestration as orchestration

    @functools.lru_cache(maxsize=8)
    def verified(cafile: str) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=cafile)

    class SharedVerify(types.ModuleType):
        def __getattr__(self, name):
            return getattr(ssl, name)

        @staticmethod
        def create_default_context(purpose=ssl.Purpose.SERVER_AUTH, *, cafile=None, capath=None, cadata=None):
            if cafile and capath is None and cadata is None and purpose is ssl.Purpose.SERVER_AUTH:
                return verified(cafile)
            return ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)

    orchestration.ssl = SharedVerify("ssl")


_share_httpx_ssl_contexts()


def pytest_configure(config):
    """In the xdist controller of a fresh checkout: rewrite the test modules' asserts once, in a thread, while
    the workers start. Every worker imports every test module to collect it; with no rewritten pyc on disk
    yet, the four of them rewrote all ~150 modules side by side (6 CPU-s each, 24 in all, in the first 30 s
    of a clean clone's run). Each file is written atomically by pytest's own functions; a worker that gets to
    a file first rewrites it itself, as before.

    Prefect's shared SSL contexts only where tests run (a worker, or a run without xdist): importing Prefect
    in the controller (1.2 s of CPU) came before it started any worker."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        _share_prefect_ssl_contexts()
        return
    _fork_workers(config)
    import sys
    import threading
    from pathlib import Path

    if sys.dont_write_bytecode:
        return
    try:
        from _pytest.assertion.rewrite import PYC_TAIL, _read_pyc, _rewrite_test, _write_pyc, get_cache_dir
        from _pytest.assertion.rewrite import assertstate_key as state_key
    except ImportError:  # another pytest: its workers rewrite as they always did
        return
    state = config.stash.get(state_key, None)
    if state is None:  # --assert=plain
        return

    def modules():  # what the command line collects (testpaths when none): test modules and conftests
        for arg in config.args:
            path = Path(config.invocation_params.dir, arg.split("::")[0])
            yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]

    def warm() -> None:
        for fn in modules():
            if not (fn.name.startswith("test_") or fn.name == "conftest.py") or fn.suffix != ".py":
                continue
            pyc = get_cache_dir(fn) / (fn.name[:-3] + PYC_TAIL)
            try:
                if _read_pyc(fn, pyc, state.trace) is None:
                    pyc.parent.mkdir(exist_ok=True)
                    stat, co = _rewrite_test(fn, config)
                    _write_pyc(state, co, stat, pyc)
            except (OSError, SyntaxError):
                continue  # the worker that imports it says what is wrong

    threading.Thread(target=warm, name="warm-assert-rewrites", daemon=True).start()


def _fork_workers(config) -> None:
    """In the xdist controller: each worker a process forked from a server that imported the project's
    packages (pyproject.toml's wheel: the flows, tasks, targets, sandbox, servers...) and what they import,
    Prefect, the Kubernetes and Google clients among them, once (llm_fleet/forkrun.py), not an interpreter that
    imports all of it again. Clean clones, 2026-12-07: the whole run took 526 machine CPU-s on a slow spell (a
    fixed CPU loop 4.6-5.2 s), where the commit before took 615-670 on one as slow. The server listens at once
    and imports while xdist starts; a worker's launcher waits for it. Test modules are imported by each worker
    itself, as pytest rewrites their asserts. Without a fork server (not Linux, ``LLM_FLEET_TEST_FORK=0``), or
    when it fails, a launcher runs ``python`` as xdist would have.

    The Prefect servers and CLIs the tests start (``tests/flows/server_support.py``'s ``python()``: the flow tests'
    server, ``prefect server start``, ``prefect deploy``) are forked from it too: it imports Prefect's server and CLI
    as well (2.3 CPU-s once; 3.5 in each server process and 1.3 in each CLI that imports them itself), once it has
    forked the workers (``--later``: 4 of a clean clone's 12 s of imports before the first worker could start)."""
    import shlex
    import shutil
    import subprocess
    import sys
    import tomllib

    if sys.platform != "linux" or os.environ.get("LLM_FLEET_TEST_FORK") == "0":
        return
    from llm_fleet import forkrun

    root = Path(__file__).resolve().parents[1]
    wheel = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    os.environ[forkrun.ENV] = f"llm-fleet-test-workers-{os.getpid()}"
    serve = [sys.executable, "-m", "llm_fleet.forkrun", "serve", os.environ[forkrun.ENV],
             "--packages", *wheel["packages"],
             "--modules", *forkrun.PRELOAD, "--later", "uvicorn", "prefect.cli", "prefect.server.api.server"]
    setpriv = shutil.which("setpriv")  # the kernel ends it with this process, a SIGKILLed one included
    server = subprocess.Popen([setpriv, "--pdeathsig=SIGKILL", "--", *serve] if setpriv else serve, cwd=root,
                              stdin=subprocess.DEVNULL)

    def stop() -> None:
        server.terminate()  # it has no handler: it ends at once (its forked workers end with their launchers)
        server.wait()

    config.add_cleanup(stop)
    config.option.tx = [f"popen//python={shlex.join(forkrun.launcher())}"] * len(config.option.tx)


# ---- the order modules start in: longest first ----------------------------------------------------------

DURATIONS = Path(__file__).with_name("durations.json")  # module -> seconds and CPU-s, by --store-durations


def _measured() -> dict[str, tuple[float, float | None]]:
    """Each module's (seconds, CPU-seconds of its worker and every process under it) in the last stored run."""
    import json

    raw = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    return {m: (v["seconds"], v.get("cpu")) if isinstance(v, dict) else (float(v), None) for m, v in raw.items()}


def _durations() -> dict[str, float]:
    return {m: seconds for m, (seconds, _) in _measured().items()}


def _tree_cpu() -> float:
    """CPU-seconds used so far by this process and the processes under it, those it has reaped included: a
    module's Prefect server, demo or campaign runs in processes of its own (Linux's /proc; elsewhere this
    process's own time). A command forked through ``python()`` (tests/flows/server_support.py) is the fork
    server's child, not under this process, and is not counted: tests/durations.json's CPU-s were stored before
    those were forked (2026-12-07), and storing them again would count a flow module's Prefect server out."""
    import time

    if not os.path.isdir("/proc/self/task"):
        return time.process_time()
    parent, used = {}, {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:  # gone meanwhile
                continue
            parent[int(pid)] = int(fields[1])
            used[int(pid)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    mine, todo = [], [os.getpid()]
    while todo:
        mine.append(todo.pop())
        todo.extend(children.get(mine[-1], ()))
    return sum(used.get(pid, 0) for pid in mine) / os.sysconf("SC_CLK_TCK")


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help=f"write each module's time (s, its tests' setup + call + teardown) and CPU-s (its worker's "
                          f"and every process under it) to {DURATIONS.name}")


def pytest_collection_modifyitems(config, items):
    """Modules start longest first, by their measured times (tests/durations.json): each worker takes the
    next module when it is free, so the run ends on the shortest ones, all workers finishing together (the
    longest-processing-time rule). Ordered by kind before (``long`` first, then flows, emulators, unit), the
    last minute was the emulators' modules that wait on the sandbox's clock, two cores ~1 busy, while the
    CPU-heavy flow modules had run side by side. A module not measured yet counts as the median, or as the
    longest when it has a test marked ``long``; a module's own ``long`` tests run first in it."""
    import statistics

    known = _durations()
    median = statistics.median(known.values()) if known else 0.0
    longest = max(known.values(), default=0.0)
    modules: dict[str, float] = {}
    for item in items:
        module = item.nodeid.partition("::")[0]
        if module not in modules or item.get_closest_marker("long"):
            modules[module] = known.get(module, longest if item.get_closest_marker("long") else median)

    def order(item) -> tuple[float, str, bool]:
        module = item.nodeid.partition("::")[0]
        return -modules[module], module, item.get_closest_marker("long") is None

    items.sort(key=order)
    if hasattr(config, "workerinput"):  # for the controller's scheduler: it sees node ids, not fixtures
        import json

        serving = sorted({i.nodeid.partition("::")[0] for i in items if "prefect_server" in getattr(i, "fixturenames", ())})
        path = _server_modules_file()
        part = path.with_name(f"{path.name}.{os.getpid()}")
        part.write_text(json.dumps(serving))
        os.replace(part, path)  # every worker collects the same modules: the last one's file is as good


def _server_modules_file() -> Path:
    """Where the workers name the modules that use the flow tests' Prefect server (the session's temp dir)."""
    import tempfile

    return Path(os.environ.get("LLM_FLEET_TEST_TMPDIR") or tempfile.gettempdir()) / "tests-prefect-modules.json"


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with two changes.

    *Lanes.* ``cores + 1`` workers run the modules that keep a core busy; the others (one of four on two
    cores) run the modules that mostly wait (the sandbox's clock, a real 40 s wake), the least CPU per second
    first measured (tests/durations.json), about one worker's share of the run's time. Longest-first alone
    ran the CPU-heavy modules four at a time in the first minutes (two cores saturated) and left the waiting
    ones for the end: the last ~100 s of every run had 1.1-1.5 of the two cores busy. A lane that has run out
    of its own modules takes the other lane's.

    *The module queued behind a long one.* An xdist worker holds its last test until the next one is queued
    (it needs to know what comes next to tear fixtures down), so a module of one or two tests takes the next
    module in the queue with it when it starts: behind the demo (one test, three to four minutes), that was
    the second-longest module, which waited there for the whole demo and started near the end of the run. A
    worker that is still busy for longer than its lane's next module would take is given its lane's shortest.

    *No server more than the lanes need.* A worker starts the flow tests' Prefect server for its first module
    that uses it. Once ``cores + 1`` other workers have one, a worker without one is given the modules that need
    none while there are some."""
    if config.getvalue("dist") != "loadfile":
        return None
    import contextlib
    import json

    from xdist.scheduler import LoadFileScheduling

    measured = _measured()
    known = {m: seconds for m, (seconds, _) in measured.items()}

    class LongestFirst(LoadFileScheduling):
        light: set[str] | None = None
        serving: set[str] = set()  # the modules that use a worker's Prefect server (the workers' file)

        @property
        def lanes(self) -> int:
            """How many workers run the modules that mostly wait: those past the cores + 1 CPU-heavy ones."""
            return max(0, len(self.nodes) - (os.cpu_count() or 1) - 1)

        def _waiting_lane(self) -> set[str]:
            """The least CPU-hungry modules, one lane's share per waiting lane (none: one lane for all)."""
            nodes, lanes = len(self.nodes), self.lanes
            rates = sorted((cpu / seconds, m) for m in self.workqueue if m in measured
                           for seconds, cpu in [measured[m]] if cpu is not None and seconds > 0)
            share = lanes * sum(known.get(m, 0.0) for m in self.workqueue) / max(nodes, 1)
            light: set[str] = set()
            for _, module in rates:
                share -= known[module]
                if share < 0:
                    break
                light.add(module)
            return light

        def _assign_work_unit(self, node) -> None:
            if self.light is None:
                self.light = self._waiting_lane()
                with contextlib.suppress(OSError, ValueError):
                    self.serving = set(json.loads(_server_modules_file().read_text()))
            if len(self.workqueue) > 1:
                waiting = bool(self.light) and self.nodes.index(node) >= len(self.nodes) - self.lanes
                queue = list(self.workqueue)
                lane = [m for m in queue if (m in self.light) == waiting] or queue
                if self._enough_servers(node):  # no new server while the lanes have modules that need none
                    lane = ([m for m in lane if m not in self.serving] or [m for m in queue if m not in self.serving]
                            or lane)
                busy = sum(known.get(scope, 0.0) * list(tests.values()).count(False) / len(tests)
                           for scope, tests in self.assigned_work.get(node, {}).items() if tests)
                pick = lane[-1] if busy > known.get(lane[0], 0.0) else lane[0]  # busy: the shortest
                self.workqueue.move_to_end(pick, last=False)
            super()._assign_work_unit(node)

        def _enough_servers(self, node) -> bool:
            """Whether ``node`` has no Prefect server yet while the CPU-heavy lanes' number of other workers
            have one. Each server costs ~6 CPU-s to start and its PostgreSQL; the demo's worker started a fourth
            after the demo (at 265-305 s in clean-clone runs h1, h2, g1) for its first flow module."""
            if not self.serving or self.serving & set(self.assigned_work.get(node, {})):
                return False
            others = sum(bool(self.serving & set(scopes)) for n, scopes in self.assigned_work.items() if n is not node)
            return others >= len(self.nodes) - self.lanes if self.lanes else False

    return LongestFirst(config, log)


_TIMES: dict[str, float] = {}
_CPU: dict[str, float] = {}
_CPU_BEFORE: list[float] = []  # in a worker: the tree's CPU-s at its previous report


def pytest_collection_finish(session):
    """Fewer garbage collections in the processes that run tests: the imports and the collected items are
    moved out of the collector's reach (gc.freeze) and a young generation holds 20,000 objects, not 700. The
    flow modules allocate heavily (pydantic, the Kubernetes client's models): test_deploy_model's worker spent
    2.0 of its 33 CPU-s in 1,463 collections, 0.7 in 281 with this."""
    import gc

    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    if session.config.getoption("store_durations"):
        _CPU_BEFORE[:] = [_tree_cpu()]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With --store-durations: each report carries the CPU-s used since the previous one (a module's fixtures'
    set-up and tear-down go with its first and last test), to the controller too (user_properties)."""
    outcome = yield
    if _CPU_BEFORE:
        now = _tree_cpu()
        outcome.get_result().user_properties.append(("cpu", now - _CPU_BEFORE[0]))
        _CPU_BEFORE[0] = now


def pytest_runtest_logreport(report):
    if report.nodeid:  # in the controller too: xdist hands it each worker's reports
        module = report.nodeid.partition("::")[0]
        _TIMES[module] = _TIMES.get(module, 0.0) + report.duration
        _CPU[module] = _CPU.get(module, 0.0) + sum(v for k, v in report.user_properties if k == "cpu")


# ---- the flow and security tests' session fixtures: one sandbox and one Prefect server per session ----

_RUNNING: list = []  # the session's sandbox, once a test has started it


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    from sandbox.app import Sandbox
    from tests.flows.conftest import TIME_SCALE

    state_dir = tmp_path_factory.mktemp("sandbox")
    # A Deployment's progress deadline is never under the product's own 10 s load-wait floor (below): the
    # bundled specs' 17 min (2 s here) was missed by a pod on a starved machine (test_teardown, -n 4).
    sb = Sandbox(time_scale=TIME_SCALE, state_dir=state_dir,
                 min_deadline_s=float(os.environ["LLM_FLEET_MIN_LOAD_TIMEOUT_S"]))
    sb.start()
    _RUNNING.append(sb)
    saved = dict(os.environ)
    os.environ.update(sb.env())
    os.environ["LLM_FLEET_TIME_SCALE"] = str(TIME_SCALE)
    os.environ["LLM_FLEET_KUBE_DIR"] = str(state_dir / "kube")
    from tasks.settings import reload_settings

    reload_settings()
    yield sb
    _RUNNING.clear()
    sb.stop()
    os.environ.clear()
    os.environ.update(saved)
    reload_settings()


@pytest.fixture(scope="module", autouse=True)
def _clusters_end_with_their_module():
    """The GKE clusters a test module made are deleted when it ends, as `clusters.delete` deletes them. A
    cluster left running keeps its kubelet probes, Managed Prometheus scrapes and health checks going (the
    real cluster's background work) for the rest of the session: after two flow modules an idle sandbox
    used 0.86 of a core, and the suite slowed down as it went."""
    before = _RUNNING[0].gke.cluster_keys() if _RUNNING else set()
    yield
    if _RUNNING:
        _RUNNING[0].gke.delete_clusters(keep=before)


@pytest.fixture(scope="session")
def prefect_server(sandbox):
    from tests.flows.harness import prefect_test_server

    with prefect_test_server():
        yield


@pytest.fixture
def sbc(sandbox):
    """The sandbox's control API; faults and behaviors are cleared after each test."""
    from sandbox.client import SandboxClient

    client = SandboxClient(sandbox.env()["LLM_FLEET_SANDBOX_URL"])
    yield client
    client.clear_faults()
    client.clear_behaviors()
    client.clear_stockouts()


def pytest_sessionfinish(session, exitstatus):
    """The suite leaves nothing in the temp dir (issue 18): what the product, the sandbox or a test left in
    the session's temp dir fails the run, by name; the dir is removed either way."""
    import shutil

    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks once all are done
        return
    if session.config.getoption("store_durations") and _TIMES:
        import json

        times = {m: {"seconds": s, "cpu": c} for m, (s, c) in _measured().items()}  # a partial run: its own only
        times.update({m: {"seconds": round(t, 1), "cpu": round(_CPU.get(m, 0.0), 1)} for m, t in _TIMES.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(times.items()))) .replace("}, ", "},\n") + "\n")
    tmp = os.environ.get("LLM_FLEET_TEST_TMPDIR")
    if not tmp or not os.path.isdir(tmp) or os.environ.get("LLM_FLEET_TEST_TMPDIR_OWNER") != str(os.getpid()):
        return
    left = sorted(n for n in os.listdir(tmp) if not n.startswith(SESSION_OWNED))
    shutil.rmtree(tmp, ignore_errors=True)
    if left:
        session.config.get_terminal_writer().line(
            f"the test session left {len(left)} file(s) in its temp dir: {', '.join(left[:20])}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
