"""The main job: sandbox + Prefect server (with UI) + deployed flows + a lifecycle, printed as it goes.

Everything runs on 127.0.0.1. The flows run in a real Prefect worker, triggered through the Prefect
API exactly as `prefect deployment run` would, and reach the sandbox only through real clients.

The Prefect server and worker run in process groups of their own and are stopped (with everything
they spawned) on every exit: the end of the lifecycle, an error, Ctrl-C, SIGTERM (CI, `timeout`, a
supervisor) or SIGHUP. Their pids are in ``<state-dir>/pids`` while they run.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from llm_fleet import forkrun, localpg
from manifests.fleet import deployment_name

ROOT = Path(__file__).resolve().parents[1]

# The lifecycle, in order: each step is a deployment in prefect.yaml run with {"spec": <path>}.
# Hold proxy pods run the product image the sandbox's env file names (LLM_FLEET_IMAGE), as local processes.
# What the summary shows with each CLI, so a user without it knows what is skipped.
TOOLS = {"kubectl": "the GPU nodes, pods, Service and model seen through kubectl",
         "gcloud": "the GKE clusters seen through gcloud"}


def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else a port no other socket takes before the Prefect server,
    seconds of imports later, binds it (``sandbox.core.free_port``: outside the kernel's ephemeral range)."""
    from sandbox.core import free_port

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    return free_port()


def _say(text: str) -> None:
    print(text, flush=True)


# Exec'd by each child first: PR_SET_PDEATHSIG (1) survives the exec, so the kernel kills the child
# when the demo dies without cleaning up (SIGKILL: pytest-timeout, the OOM killer). SIGKILL, because
# a starting Prefect server sits on SIGTERM for tens of seconds and nobody is left to escalate; an
# orderly exit has stopped the children (SIGTERM first) before this can fire.
# (If the demo died before prctl ran, the parent pid has changed already: exit instead.)
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, int(signal.SIGKILL)); "
                    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.argv[2], sys.argv[2:])")


class Children:
    """Processes started in process groups of their own; :meth:`stop` ends them and all they spawned."""

    def __init__(self, pidfile: Path) -> None:
        self.pidfile = pidfile
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        if sys.platform == "linux":  # even a SIGKILLed demo takes them along: SIGTERM when it dies
            cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        self.pidfile.write_text("".join(f"{n} {p.pid}\n" for n, p in self.procs))
        return proc

    def stop(self, timeout: float = 10.0) -> None:
        """The newest first, each asked (SIGTERM) and waited for before the next: a process stops before what
        it talks to (the worker before the Prefect server, the server before its PostgreSQL). Asked all at
        once, the worker outlived its server and spent 8 s of its exit retrying its last events. The waits
        share ``timeout``, each 2 s at least (one that hangs leaves the next its time to shut down); what is
        still there after them is killed (SIGKILL), with all it spawned."""
        grace = min(2.0, timeout)
        deadline = time.monotonic() + timeout
        asked: list[tuple[subprocess.Popen, list[int]]] = []
        for _, proc in reversed(self.procs):
            tree = _descendants([proc.pid])  # flow runs may sit in sessions of their own
            _signal(proc, tree, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(grace, deadline - time.monotonic()))
            asked.append((proc, tree))
        for proc, tree in asked:
            tree = [pid for pid in tree if _alive(pid)]
            if proc.poll() is None or tree:
                _signal(proc, tree, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()


def _signal(proc: subprocess.Popen, tree: list[int], sig: int) -> None:
    """``sig`` to the process's group (it was started in a session of its own) and to every pid in ``tree``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _stop_leftovers(pidfile: Path) -> None:
    """Stop what a previous run recorded in ``pidfile`` if it is still a Prefect process or the fork server."""
    with contextlib.suppress(OSError, ValueError):
        for line in pidfile.read_text().splitlines():
            pid = int(line.split()[-1])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
            if b"prefect" in cmdline or b"llm_fleet.forkrun" in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGTERM)


def _descendants(pids: list[int]) -> list[int]:
    """Every process below ``pids`` (Linux /proc; elsewhere the process groups have to do)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone, only unreaped
    return True


_STOPPING: list[int] = []  # the signal that asked the demo to stop, once one has


def _exit_on_signal(signum: int, _frame: Any) -> None:
    # SIGTERM/SIGHUP become SystemExit, so every `finally` (and the cleanup in it) runs.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
    _STOPPING.append(signum)
    _say(f"\n… stopping ({signal.Signals(signum).name}): Prefect server, worker and sandbox")
    raise SystemExit(128 + signum)


def _pause(seconds: float) -> None:
    """A poll's sleep that ends the demo if a stop signal came. Python runs a signal handler wherever the main
    thread is, a finalizer too (``__del__``, a weakref callback, a generator closed by the GC), and there the
    handler's SystemExit is printed as "Exception ignored" and dropped: the demo ran on after SIGTERM."""
    time.sleep(seconds)
    if _STOPPING:
        raise SystemExit(128 + _STOPPING[0])


def take_ctrl_c() -> None:
    """Ctrl-C stops the demo whatever its parent left it: an inherited ignored or blocked SIGINT (a Python
    started with SIGINT ignored installs no KeyboardInterrupt) would leave it running after Ctrl-C."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for_ctrl_c() -> None:
    """Return on Ctrl-C (SIGINT). Not ``signal.pause()``: the kernel hands a process's signal to any of its
    threads (the sandbox runs dozens here), and pause() in the main thread then never returns; Python runs the
    handler in the main thread at its next check, which this short sleep gives it."""
    take_ctrl_c()
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            _pause(0.2)


def _prefect(*args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "prefect", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed:\n{res.stdout}\n{res.stderr}")


def _prefect_database(children: Children, cleanup: contextlib.ExitStack, state_dir: Path, log: Any) -> dict[str, str]:
    """The Prefect server's database: a PostgreSQL of the demo's own where one is installed (on SQLite, runs
    that overlap, as the scheduled checks at :00 do, can stall the server for a minute), else SQLite."""
    binaries = localpg.bin_dir()
    if binaries is None or not localpg.usable_under(Path(tempfile.gettempdir())):
        _say("· Prefect server on SQLite (no PostgreSQL here): overlapping runs may stall it for up to a minute; "
             "with PostgreSQL installed the demo runs one")
        return {}
    try:
        data = localpg.init(binaries)
        cleanup.callback(data.remove)
        data.record(state_dir / "postgres")  # a SIGKILLed demo's: removed by the next one
        server = children.start("postgres", data.server_command(), stdout=log, stderr=log)
        data.wait_ready(server=server, timeout=60)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:  # a broken install: the demo still runs
        _say(f"· PostgreSQL did not start ({str(exc).splitlines()[0][:200]}; its log: {state_dir}/prefect.log): "
             "the Prefect server uses SQLite")
        return {}
    _say(f"✓ PostgreSQL for the Prefect server: 127.0.0.1:{data.port}")
    return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": data.url}


def one_certificate_ca(path: Path) -> str:
    """A CA file of one certificate (certifi's first), for Prefect clients of an API on plain HTTP (the
    demo's own server, worker, flow runs and CLIs; the test suite's servers).

    No certificate is ever checked there; yet each Prefect client first builds an SSL context from its CA
    file, by default certifi's ~140 roots: 20 ms of CPU per client, and `prefect deploy --all` alone makes
    ~150 clients (42 % of its CPU). One certificate parses in 0.4 ms. Only those processes get it, not the
    demo's env file: that may be sourced to reach a real API over TLS."""
    import certifi

    if not path.exists():
        pem = Path(certifi.where()).read_text()
        end = "-----END CERTIFICATE-----"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pem[pem.index("-----BEGIN CERTIFICATE-----"):pem.index(end) + len(end)] + "\n")
    return str(path)


def _create_work_pool() -> None:
    """The `local` process pool (what `prefect work-pool create local --type process` makes, without that
    CLI's seconds of start-up), with the engine command set: Prefect's process worker otherwise starts each
    flow run through a workspace supervisor, a second interpreter per run (~2 s of CPU) for dependency
    installation the demo does not use. The command is llm_fleet/forkrun.py's launcher: each run is a
    process forked from a server that imported Prefect and the flows once (`python -m prefect.engine`
    itself where no fork server answers)."""
    import shlex

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = shlex.join(forkrun.launcher())
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="local", type="process", base_job_template=template),
                                overwrite=True)


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as http:  # one client for the polls: each new one costs ~30 ms of CPU
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if http.get(url).status_code == 200:
                    return
            _pause(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _run(name: str, params: dict[str, Any], ui: str, *, expect_failure: bool = False, timeout: float = 900) -> Any:
    """Trigger a deployment through the Prefect API (as `prefect deployment run` does) and wait, printing progress."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    shown = {k: (Path(v).name if k == "spec" else (v[:12] if k == "revision" else v)) for k, v in params.items()}
    _say(f"\n▶ {name}  " + " ".join(f"{k}={v}" for k, v in shown.items()))
    start = time.monotonic()
    run = run_deployment(name=name, parameters=params, timeout=0)
    line = _ProgressLine()
    with get_client(sync_client=True) as client:
        while time.monotonic() - start < timeout:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            line.show(_progress_artifacts(client, run.id))
            _pause(0.5)
    line.close()
    state = run.state
    completed = bool(state and state.is_completed())
    mark = "✓" if completed != expect_failure else "✗"
    _say(f"  {mark} {run.name}: {state.name if state else '?'} in {time.monotonic() - start:.1f}s   "
         f"UI: {ui}/runs/flow-run/{run.id}")
    if state and not completed:
        _say(f"  {'as rehearsed — ' if expect_failure else ''}cause: {(state.message or '').splitlines()[0][:300]}")
    return run


def _ok(run: Any) -> bool:
    return bool(run.state and run.state.is_completed())


def _held_request(spec: Any, sandbox: Any, timeout: float = 300) -> tuple[int, float, str]:
    """One completion through the live Service while the model is parked: (status, seconds, answer)."""
    from sandbox.client import SandboxClient

    state = SandboxClient(sandbox.env()["LLM_FLEET_SANDBOX_URL"]).state()
    ports = [p for c in [*(state.get("clusters_kube") or {}).values(), state.get("kube", {})]
             for key, p in (c.get("service_ports") or {}).items() if key == f"{spec.namespace}/{spec.name}"]
    if not ports:
        return 0, 0.0, "the live Service has no sandbox address"
    body = ({"inputs": "Hello", "parameters": {"max_new_tokens": 8}} if spec.engine.kind == "tgi"
            else {"model": spec.model.id, "prompt": "Hello", "max_tokens": 8})
    path = "/generate" if spec.engine.kind == "tgi" else "/v1/completions"
    start = time.monotonic()
    try:
        resp = httpx.post(f"http://127.0.0.1:{ports[0]['port']}{path}", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        return 0, time.monotonic() - start, type(exc).__name__
    text = resp.text[:120].replace("\n", " ")
    return resp.status_code, time.monotonic() - start, text


def _lifecycle(spec_path: str, sandbox: Any, ui: str) -> bool:
    """provision → deploy → release → a bad release rolled back → park → a request held across the wake →
    report → teardown, each a flow run of its deployment in the worker."""
    import threading

    from manifests.spec import load_spec

    spec = load_spec(spec_path)
    started = datetime.now(UTC)
    for name in (deployment_name("provision_cluster"), deployment_name("deploy_model")):
        if not _ok(_run(name, {"spec": spec_path}, ui)):
            return False
    if spec.expose.playground:
        from manifests import playground

        _say(f"· chat playground: {playground.where(spec)} (source the env file first)")
    good = sandbox.hub.push_revision(spec.model.id, title="demo: fine-tuned weights")
    _say(f"\n· the Hub has a new commit of {spec.model.id} on main: {good[:12]}")
    if not _ok(_run(deployment_name("release_model"), {"spec": spec_path, "revision": good}, ui)):
        return False
    # on a branch of its own: main stays on the good commit, so the README's next deploy works
    bad = sandbox.hub.push_revision(spec.model.id, branch="demo-broken-weights", title="demo: broken weights")
    sandbox.runtime.behaviors.add(mode="wrong_answers", revision=bad)  # its pods answer empty text
    _say(f"· a commit on branch demo-broken-weights, {bad[:12]}, has broken weights (the sandbox makes its pods "
         "answer nothing)")
    if _ok(_run(deployment_name("release_model"), {"spec": spec_path, "revision": bad}, ui, expect_failure=True)):
        return False
    if not _ok(_run(deployment_name("park_model"), {"spec": spec_path}, ui)):
        return False
    result: dict[str, Any] = {}
    held = threading.Thread(target=lambda: result.update(r=_held_request(spec, sandbox)), daemon=True)
    _say("\n▶ a request to the parked model (the hold proxy keeps it and asks for a wake) …")
    held.start()
    held.join(timeout=320)
    status, seconds, text = result.get("r", (0, 0.0, "no answer"))
    _say(f"  {'✓' if status == 200 else '✗'} answered {status} after {seconds:.1f}s, held across the automatic "
         f"wake: {text}")
    _show_wake_runs(ui)
    _run(deployment_name("gpu_report"), {"start": started.isoformat()}, ui)  # GPU-hours since the demo began
    return status == 200


def _teardown(spec_path: str, ui: str, env: dict[str, str], state_dir: Path) -> bool:
    from manifests.spec import load_spec

    run = _run(deployment_name("teardown"), {"spec": spec_path, "cluster": True, "dry_run": False}, ui)
    spec = load_spec(spec_path)
    _show("nothing left: GKE clusters after teardown",
          ["gcloud", "container", "clusters", "list", f"--project={spec.cluster.project}"],
          {**env, "HOME": str(state_dir / "home")})
    return _ok(run)


def _show_wake_runs(ui: str) -> None:
    """The wake_model runs the hold proxy's event started (through the deployment trigger)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["wake_model"])))
        # (the Scheduled ones are the specs' wake schedules, synced by sync_schedules)
        for run in [r for r in runs if r.state and not r.state.is_scheduled()]:
            _say(f"  ↳ wake_model run {run.name} (started by the event trigger): "
                 f"{run.state.name if run.state else '?'}   UI: {ui}/runs/flow-run/{run.id}")


def _pause_schedules(flow: str) -> str:
    """Pause a deployment's schedules (park_idle would park a model the user tries after the demo)."""
    from prefect.client.orchestration import get_client

    name = deployment_name(flow)
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(name)
        for s in client.read_deployment_schedules(dep.id):
            client.update_deployment_schedule(dep.id, s.id, active=False)
    return (f"✓ {name}'s schedule paused: idle models are not parked behind your back (resume it in the UI, "
            "or run the demo with --park-idle)")


def _left_running(ui: str, sandbox: Any, state_dir: Path, spec_path: str, *, park_idle: bool) -> str:
    """What --keep-running leaves up, and how to use it: the README's next steps work as it says."""
    from manifests.spec import load_spec

    spec = load_spec(spec_path)
    return "\n".join([
        "\n— Left running until Ctrl-C (which stops them all) —",
        f"  Prefect server + UI   {ui}   (API {ui}/api; deployments: `prefect deployment ls`)",
        "  Prefect worker        pool 'local', runs the flows of this checkout",
        f"  sandbox               {sandbox.url}   (source {state_dir}/env for kubectl, gcloud, prefect)",
        f"  Hub main of {spec.model.id}: a good commit (the broken one is on branch demo-broken-weights)",
        f"  cluster {spec.cluster.name}: torn down by the demo; provision and deploy again with",
        f"    prefect deployment run '{deployment_name('provision_cluster')}' --param spec={spec_path}",
        f"    prefect deployment run '{deployment_name('deploy_model')}' --param spec={spec_path}",
        f"  park_idle: {'scheduled every 5 min' if park_idle else 'paused (idle models stay up)'}; the other "
        "schedules (check_fleet, watch_revisions, gpu_report, sync_schedules) are active",
    ])


def _prefect_quiet(what: str, env: dict[str, str]) -> None:
    """Best-effort set-up steps whose failure the lifecycle does not depend on."""
    if what == "sync_schedules":
        res = subprocess.run([sys.executable, "-m", "llm_fleet.cli", "schedules", "sync"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        _say("✓ park/wake schedules synced from the specs" if res.returncode == 0
             else f"! schedules sync: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")


def _progress_artifacts(client: Any, flow_run_id: Any) -> list[Any]:
    """The run's progress artifacts (the long waits: GKE operations, model load), oldest first."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    try:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    except Exception:  # noqa: BLE001 - progress is a courtesy
        return []
    return sorted(arts, key=lambda a: a.created or 0)


class _ProgressLine:
    """One line of progress: rewritten in place on a terminal, a new line per step or 25 % otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last: tuple[str, int] | None = None
        self.width = 0

    def show(self, artifacts: list[Any]) -> None:
        if not artifacts:
            return
        art = artifacts[-1]  # the wait going on now
        pct = float(art.data or 0)
        text = f"  ⏳ {art.description or 'waiting'} — {pct:.0f}%"
        if self.tty:
            sys.stdout.write("\r" + text[:120].ljust(self.width))
            sys.stdout.flush()
            self.width = min(120, len(text))
            return
        key = (str(art.id), int(pct // 25))
        if key != self.last:
            self.last = key
            _say(text)

    def close(self) -> None:
        if self.tty and self.width:
            sys.stdout.write("\r" + " " * self.width + "\r")
            sys.stdout.flush()


def _spec_path(raw: Path) -> Path:
    """The user's path (from the current directory), else one relative to the checkout."""
    for candidate in (raw, ROOT / raw):
        if candidate.exists():
            return candidate.resolve()
    return raw


def _check_tools() -> None:
    for tool, shows in TOOLS.items():
        if shutil.which(tool) is None:
            _say(f"! {tool} is not on PATH: the summary skips {shows} (install it to see them)")


def _show(title: str, cmd: list[str], env: dict[str, str]) -> None:
    """Run a real CLI (kubectl, gcloud) against the sandbox and print what it says."""
    if shutil.which(cmd[0]) is None:
        return
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    _say(f"\n$ {' '.join(cmd)}    # {title}")
    _say((res.stdout or res.stderr).rstrip())


def _summarise(spec_path: str, env: dict[str, str], state_dir: Path) -> None:
    from manifests.spec import load_spec
    from sandbox.client import SandboxClient

    spec = load_spec(ROOT / spec_path)
    _say("\n— What the sandbox holds now (asked with the real CLIs) —")
    tool_env = {**env, "HOME": str(state_dir / "home")}  # kubectl caches discovery per HOME
    _show("GKE clusters", ["gcloud", "container", "clusters", "list", f"--project={spec.cluster.project}"], tool_env)
    c = spec.cluster
    # Where provision_cluster wrote the cluster's kubeconfig (LLM_FLEET_KUBE_DIR).
    kubeconfig = str(Path(env["LLM_FLEET_KUBE_DIR"]) / f"{c.project}_{c.location}_{c.name}.yaml")
    if Path(kubeconfig).exists():
        kc = ["kubectl", "--kubeconfig", kubeconfig]
        _show("GPU nodes", [*kc, "get", "nodes", "-L", "cloud.google.com/gke-accelerator"], tool_env)
        _show("what deploy_model applied", [*kc, "get", "deploy,svc,pods", "-n", spec.namespace,
                                            "-l", f"app.kubernetes.io/instance={spec.name}"], tool_env)
        _show("which color the live Service routes to",
              [*kc, "get", "svc", spec.name, "-n", spec.namespace, "-o", "jsonpath={.spec.selector}"], tool_env)
        _show("the model, through the Service",
              [*kc, "get", "--raw", f"/api/v1/namespaces/{spec.namespace}/services/{spec.name}:http/proxy"
               + ("/info" if spec.engine.kind == "tgi" else "/v1/models")], tool_env)
    msgs = SandboxClient(env["LLM_FLEET_SANDBOX_URL"]).slack_messages()
    heads = [m for m in msgs if not m.get("thread_ts") or m.get("thread_ts") == m.get("ts")]
    for msg in heads:
        _say("\nslack " + str(msg.get("channel", "")) + ": " + str(msg.get("text", "")).replace("\n", "\n    "))


def main(args: argparse.Namespace) -> int:
    from manifests.spec import SpecError, load_spec

    # Everything that can be wrong with the input is found before anything starts.
    spec_path = _spec_path(Path(args.spec))
    try:
        if load_spec(spec_path).target != "gke":
            raise SpecError("target", "the demo runs the GKE lifecycle", "pick a spec with target: gke",
                            source=str(spec_path))
    except SpecError as exc:
        _say(f"✗ {exc}")
        return 2
    if args.time_scale <= 0:
        _say(f"✗ --time-scale must be above 0, not {args.time_scale}")
        return 2
    spec = str(spec_path)
    state_dir = Path(args.state_dir).resolve()
    _check_tools()

    take_ctrl_c()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where each thread is
    from sandbox.app import Sandbox

    if state_dir.exists():
        _stop_leftovers(state_dir / "pids")  # a previous demo that was killed with SIGKILL
        localpg.remove_recorded(state_dir / "postgres")
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)
    _say(f"llm-fleet demo — sandbox time scale {args.time_scale} (cloud delays × {args.time_scale})")
    sandbox = Sandbox(time_scale=args.time_scale, state_dir=state_dir)
    children = Children(state_dir / "pids")
    log = open(state_dir / "prefect.log", "w")  # noqa: SIM115 - closed in finally
    database = contextlib.ExitStack()
    try:
        sandbox.start()
        env = {**os.environ, **sandbox.env()}
        env.update({
            "LLM_FLEET_HOME": str(ROOT), "LLM_FLEET_TIME_SCALE": str(args.time_scale),
            "LLM_FLEET_KUBE_DIR": str(state_dir / "kube"),
            "PREFECT_HOME": str(state_dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # concurrency leases (Vertex models' locks) survive a server restart (default: in memory)
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
            "PREFECT_LOGGING_LEVEL": "INFO",  # `prefect flow-run logs` shows what each step did
        })
        _say(f"✓ sandbox up: {sandbox.env().get('LLM_FLEET_SANDBOX_URL')}  "
             f"(source {state_dir}/env to use kubectl, gcloud)")

        env.update(_prefect_database(children, database, state_dir, log))
        port = _free_port(4200)
        api = f"http://127.0.0.1:{port}/api"
        env["PREFECT_API_URL"] = api
        env["PREFECT_API_SSL_CERT_FILE"] = one_certificate_ca(state_dir / "prefect-api-ca.pem")
        # The demo's runs are created on demand: a 1 s poll starts each within a second (default: up to 10 s).
        # The worker's runner keeps its storage under the temp dir and leaves the folder behind: the demo's
        # own temp dir keeps the machine's clean (removed with the state dir).
        (state_dir / "tmp").mkdir()
        worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "TMPDIR": str(state_dir / "tmp"),
                      forkrun.ENV: f"llm-fleet-forkrun-{os.getpid()}"}
        # The flow runs' fork server (llm_fleet/forkrun.py), with the environment the worker gives each run;
        # its imports overlap the Prefect server's start.
        children.start("flow-run-forkserver", [sys.executable, "-m", "llm_fleet.forkrun", "serve",
                                               worker_env[forkrun.ENV]], cwd=ROOT, env=worker_env,
                       stdout=log, stderr=log)
        # The block catalog without importing every installed collection first: Prefect's memoizing wrapper
        # imports them (prefect_gcp pulls in google.cloud.aiplatform and grpc) only to hash the registry for a
        # memo that a fresh state dir never has. Registration itself still runs, the collections' block types
        # from Prefect's bundled data: the same 54 types. Server start: 10.9 -> 6.5 CPU-s, 13 -> 8.5 s.
        server_env = {**env, "PREFECT_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"}
        server = children.start("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host",
                                                   "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=server_env, stdout=log, stderr=log)
        _wait_http(f"{api}/health", 300, server)  # minutes on a loaded 2-core machine
        _say(f"✓ Prefect server + UI: http://127.0.0.1:{port}")
        # Before this process first imports Prefect: its settings are read from the environment then.
        os.environ.update({"PREFECT_API_URL": api, "PREFECT_API_SSL_CERT_FILE": env["PREFECT_API_SSL_CERT_FILE"]})
        _create_work_pool()
        # The worker polls the pool: it starts while the flows are deployed.
        children.start("prefect-worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", "local",
                                          "--limit", "4"], cwd=ROOT, env=worker_env, stdout=log, stderr=log)
        _prefect("--no-prompt", "deploy", "--all", env=env)
        _say("✓ flows deployed (prefect.yaml) to work pool 'local'")
        _say("✓ worker started")

        _prefect_quiet("sync_schedules", env)
        if not args.park_idle:
            _say(_pause_schedules("park_idle"))
        ui = f"http://127.0.0.1:{port}"
        ok = _lifecycle(spec, sandbox, ui)
        _summarise(spec, env, state_dir)
        ok = _teardown(spec, ui, env, state_dir) and ok
        _say(f"\nkubectl: `source {state_dir}/env && kubectl get pods -A` (while the sandbox runs)")
        if args.keep_running:
            _say(_left_running(ui, sandbox, state_dir, spec, park_idle=args.park_idle))
            wait_for_ctrl_c()
        else:
            _say("(rerun with --keep-running to keep the Prefect UI up and browse these runs)")
        return 0 if ok else 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        children.stop()
        database.close()  # after the Prefect server: it holds connections to it
        log.close()
        sandbox.stop()
        _say("✓ stopped: Prefect server, worker and sandbox")
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
