"""A seeded random fault campaign: operations and faults at random, invariants checked continuously.

A random walk (seeded: the same seed makes the same choices) over deploy, release of a good or a bad
revision, rollback, park, wake (by a held request), teardown of another model in the same pool, and
faults around them: the flow process killed at a random moment, the Prefect server restarted, API
429/503/reset bursts, endpoint propagation lag, a probe and scrape storm on a parked model, a second
concurrent operation on the same model, spot preemption of a GPU node (when the sandbox has it).
Every operation is its own process, as a Prefect worker runs each flow run, so a kill is a real SIGKILL
of its process group: forked from a server that imported the flows once (``OpProcess``), or a new
interpreter (``--run-op``, with ``--fresh-processes``). Constant client load goes through the live Service's own address all the time, and a
watch thread checks the invariants while everything runs:

* I1 the live Service never selects a color without Ready endpoints while the model is not parked;
* I2 the pod template of the color the live Service selects never changes while it is selected;
* I3 every client request gets a 2xx, or a 503 with Retry-After — never a reset, a 502 or a 5xx
  without Retry-After;
* I4 after every operation that ended (whatever its outcome): no stray color, the GPU pods the policy
  calls for, GPU nodes no more than the pods need; a parked model stays parked under probes and scrapes;
* I5 no operation waits on a lock whose holder is gone for longer than the lease.

Prints the ops run, fault kinds exercised, requests sent, violations per invariant, the seed and the
operation log (on a violation), ending with ``violations: <total>``.

    uv run python bench/campaign.py --seed 1 --ops 200 [--env FILE] [--time-scale 0.005]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_fleet import forkrun  # noqa: E402 - after the checkout is on the path (standard library only)

SPEC = "deployments/gemma2-2b-it-vllm-l4.yaml"
MODEL_LABEL, COLOR_LABEL = "app.kubernetes.io/instance", "llm-fleet.dev/color"
PARK_RECORD = "llm-fleet.dev/park-record"
PROBE_AGENTS = ("kube-probe/1.30", "GoogleHC/1.0", "Prometheus/2.51.0")
BAD_MODES = ("crash_loop", "http_500", "wrong_answers")
# (op, weight): the walk's menu. Faults wrap an operation (kill, restart, burst, lag, concurrent).
MENU = [("release_good", 4), ("release_bad", 2), ("rollback", 1), ("park", 2), ("wake", 2), ("deploy", 1),
        ("other_cycle", 1), ("kill", 2), ("prefect_restart", 1), ("api_burst", 2), ("endpoint_lag", 1),
        ("probe_storm", 1), ("concurrent", 1), ("spot_preempt", 1)]
FLOW_OPS = ("release_good", "release_bad", "rollback", "park", "wake", "deploy")


# ---- one operation, in its own process ---------------------------------------------------------------

def run_op(op: str, spec: str, revision: str | None) -> int:
    """``--run-op``: one flow run, as a worker would start it; prints a JSON line with the outcome."""
    out = op_outcome(op, spec, revision)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


# What every operation imports: loaded once in the fork server (below), not again per operation. A profile
# of one release op (py-spy, 40 Hz) had 65 % of its CPU samples in imports (then a quarter of them
# google-cloud-compute's generated types, for the capacity step's quota read: now plain REST).
PRELOAD = ["flows.provision_cluster", "flows.deploy_model", "flows.release_model", "flows.park", "flows.teardown",
           *forkrun.PRELOAD]  # the demo worker's fork server's: the clients and what steps import on first use


def _op_child(conn: Any, op: str, spec: str, revision: str | None, log: str) -> None:
    """One operation in a process forked from the fork server: its own session (a kill of the group kills
    whatever it started, as for a fresh process), its output in ``log``, the outcome sent back."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    out = op_outcome(op, spec, revision)
    conn.send(json.dumps(out))
    conn.close()


class OpProcess:
    """An operation's process forked from a server that imported the flows once (multiprocessing's
    ``forkserver`` with ``PRELOAD``): a fresh process per flow run as a Prefect worker starts one — a
    SIGKILL of its group is still a real kill mid-step — without ~5 s of imports each time. It has the
    parts of ``subprocess.Popen`` the campaign uses (pid, wait, communicate, returncode)."""

    def __init__(self, ctx: Any, op: str, spec: str, revision: str | None, log: Path) -> None:
        self._r, w = ctx.Pipe(duplex=False)
        self.log = log
        self.proc = ctx.Process(target=_op_child, args=(w, op, spec, revision, str(log)))
        self.proc.start()
        w.close()
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("campaign op", timeout or 0)
        return self.proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        out = ""
        while not out:  # the outcome comes just before the exit; a killed op sends nothing
            if self._r.poll(0.2):
                try:
                    out = self._r.recv()
                except EOFError:
                    break
            elif not self.proc.is_alive():
                if not self._r.poll(0):
                    break
            elif deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("campaign op", timeout or 0)
        self.wait(30)
        err = self.log.read_text(errors="replace") if self.log.exists() else ""
        return out, err


def op_outcome(op: str, spec: str, revision: str | None) -> dict[str, Any]:
    """One flow run; its outcome (ok, error or result) as a dict — never raised."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from tasks.settings import reload_settings

    reload_settings()
    try:
        if op == "provision":
            from flows.provision_cluster import provision_cluster
            out = provision_cluster(spec=spec)
        elif op == "deploy":
            from flows.deploy_model import deploy_model
            out = deploy_model(spec=spec)
        elif op == "release":
            from flows.release_model import release_model
            out = release_model(spec=spec, revision=revision)
        elif op == "rollback":
            from flows.release_model import rollback_model
            out = rollback_model(spec=spec)
        elif op == "park":
            from flows.park import park_model
            out = park_model(spec=spec, reason="campaign")
        elif op == "wake":
            from flows.park import wake_model
            out = wake_model(spec=spec, reason="held request")
        elif op == "teardown":
            from flows.teardown import teardown
            out = teardown(spec=spec)
        else:
            raise SystemExit(f"unknown op {op}")
    except Exception as exc:  # noqa: BLE001 - the outcome is reported, not raised
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
    return {"ok": True, "result": str(out)[:300]}


# ---- the Prefect server the ops report to (restartable: a fault kind) --------------------------------

class PrefectServer:
    def __init__(self, home: Path) -> None:
        from tests.flows.server_support import free_port

        self.home, self.port = home, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self, timeout: float = 180) -> None:
        import httpx

        from tests.flows.harness import NO_BLOCK_REGISTRATION
        from tests.flows.server_support import prefect_env

        self.home.mkdir(parents=True, exist_ok=True)
        env = {**prefect_env(self.home), **NO_BLOCK_REGISTRATION}  # as the flow tests' servers (harness.py)
        log = open(self.home / "server.log", "a")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--no-services"], cwd=ROOT, env=env,
                                     stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as http:  # one client for the polls: each new one costs ~30 ms of CPU
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.api}/health").status_code == 200:
                        return
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"prefect server did not start: {(self.home / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)

    def stop(self) -> None:
        """The whole process group: `prefect server start` runs the server in a child of its own."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
        self.restarts += 1


# ---- client load through the live address ------------------------------------------------------------

class Load:
    """Constant requests to the live Service's address; I3 judged on every answer."""

    def __init__(self, url: str, model: str, threads: int, violate, rate: float = 20.0) -> None:
        self.url, self.model, self.violate = url, model, violate
        self.pause = 1.0 / rate if rate > 0 else 0.0  # per thread: steady, not a CPU hog on a shared machine
        self.sent = 0
        self.outcomes: Counter[str] = Counter()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"load-{i}") for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                self.sent += 1
                try:
                    answer: Any = self._post(http)
                except httpx.HTTPError as exc:
                    if self.stop.is_set():  # the campaign's teardown stopped the sandbox under a held request
                        self.outcomes["cut by the campaign's own teardown"] += 1
                        return
                    answer = exc
                kind, problem = judge_answer(answer)
                self.outcomes[kind] += 1
                if problem:
                    self.violate("I3", problem)
                if isinstance(answer, httpx.TimeoutException):
                    continue
                time.sleep(self.pause if kind.startswith("2") else 0.05)

    def _post(self, http: Any) -> Any:
        answer, resent = post_as_a_client(http, "/v1/completions",
                                          {"model": self.model, "prompt": "Hi", "max_tokens": 2})
        if resent:
            self.outcomes["sent again: keep-alive connection closed by the server before an answer"] += 1
        return answer


def post_as_a_client(http: Any, path: str, body: dict[str, Any]) -> tuple[Any, bool]:
    """(the answer, whether it was sent twice): one request as the OpenAI SDK's client sends it, with the one
    retry HTTP/1.1 allows every client (RFC 9112 9.3.1): the server closed a *reused* keep-alive connection
    before any byte of an answer (uvicorn closes idle connections at SIGTERM; a request sent at that moment
    meets the close). Sent again once, on a new connection; any other error, or a second failure, raises."""
    import httpx

    opened: list[str] = []

    def trace(name: str, info: dict[str, Any]) -> None:
        if name.startswith("connection.connect_tcp"):
            opened.append(name)

    try:
        return http.post(path, json=body, extensions={"trace": trace}), False
    except httpx.HTTPError as exc:
        if not keep_alive_close_race(exc, reused=not opened):
            raise
    return http.post(path, json=body), True


def keep_alive_close_race(exc: BaseException, *, reused: bool) -> bool:
    """The one failure a client may retry without knowing the request's semantics: a reused connection the
    server closed before sending any byte of an answer. A refused or new connection, a timeout, a reset
    while reading (the answer may have been cut midway) is never this."""
    import httpx

    if not reused:
        return False
    if isinstance(exc, httpx.RemoteProtocolError):  # h11: EOF before any byte of the answer
        return "without sending a response" in str(exc)
    return isinstance(exc, httpx.WriteError)  # reset while the request was still being sent


def judge_answer(answer: Any) -> tuple[str, str | None]:
    """I3 on one client request: its outcome (for the counts) and the violation, or None when it is allowed.
    ``answer`` is the httpx.Response, or the httpx error raised instead. A client timeout is a request held
    past the client's patience, not a violation; any other transport error (a reset, a refused connection),
    a 502 or any non-2xx other than a 503 with Retry-After is."""
    import httpx

    if isinstance(answer, httpx.TimeoutException):
        return "client timeout (held)", None
    if isinstance(answer, BaseException):
        return type(answer).__name__, f"request failed at the transport: {type(answer).__name__}: {answer}"
    code = answer.status_code
    if 200 <= code < 300 or (code == 503 and answer.headers.get("retry-after")):
        return str(code), None
    return str(code), f"HTTP {code} without Retry-After: {answer.text[:160]}"


# ---- I4 and I5 on given observations (the campaign reads them from the cluster) ------------------------

def policy_problem(*, parked: bool, selector: dict[str, str], pods: dict[str, str | None],
                   live_replicas: int | None, other_pods: int, gpu_nodes: int) -> str:
    """I4 once an operation ended: what differs from the policy ("" when nothing). ``pods``: the model's GPU
    pods (name -> color), ``live_replicas``: the selected color's Deployment's replicas, ``other_pods``: the
    other model's GPU pods in the same pool, ``gpu_nodes``: GPU nodes in the cluster."""
    if parked:
        if pods:
            return f"parked, yet {len(pods)} GPU pods run"
    else:
        live = selector.get(COLOR_LABEL)
        if live is None:
            return f"the live Service selects no color and no park record says parked: {selector}"
        stray = sorted(name for name, color in pods.items() if color != live)
        if stray:
            return f"stray GPU pods of the non-live color: {stray}"
        if not live_replicas:
            return f"the live color {live} is at 0 replicas and not parked"
    need = len(pods) + other_pods
    if gpu_nodes > max(need, 0) and gpu_nodes > 1:
        return f"{gpu_nodes} GPU nodes for {need} GPU pods"
    return ""


def dead_holder_problem(*, holder: str, pid: int, dead_for: float, lease_s: float, slack_s: float = 15.0) -> str | None:
    """I5 on one read of the model's Lease, ``dead_for`` seconds after process ``pid`` was killed: the
    violation when it still holds it past the lease (+ ``slack_s``: the poll period, a loaded machine), else
    None. The holder identity is tasks.locks' ``purpose@host:pid:nonce``."""
    if f":{pid}:" in holder and dead_for > lease_s + slack_s:
        return f"the killed holder (pid {pid}) still holds the lock {dead_for:.0f} s later (lease {lease_s:.0f} s)"
    return None


# ---- the watch: I1 and I2 while everything runs ------------------------------------------------------

@dataclass(frozen=True)
class Seen:
    """One look at the live Service: the color it selects (None: none), whether a park record is on it, the
    selected color's pod template (canonical JSON) and its Ready endpoint addresses."""

    color: str | None
    parked: bool
    template: str = ""
    ready: int = 0


def look(api: Any, namespace: str, name: str) -> Seen:
    """Read what the watch judges from the cluster (``api``: a kubernetes ApiClient)."""
    from kubernetes import client as k8s

    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    svc = core.read_namespaced_service(name, namespace)
    color = (svc.spec.selector or {}).get(COLOR_LABEL)
    parked = PARK_RECORD in (svc.metadata.annotations or {})
    if color is None or parked:
        return Seen(color, parked)
    dep = apps.read_namespaced_deployment(f"{name}-{color}", namespace)
    template = json.dumps(api.sanitize_for_serialization(dep.spec.template), sort_keys=True)
    ep = core.read_namespaced_endpoints(name, namespace)
    return Seen(color, parked, template, sum(len(s.addresses or []) for s in ep.subsets or []))


@dataclass
class Watch:
    kubeconfig: str
    namespace: str
    name: str
    violate: Any
    grace_s: float = 2.0  # an endpoint controller's own lag is not a violation; seconds of no endpoints are
    stop: threading.Event = field(default_factory=threading.Event)
    selected: tuple[str, str] | None = None  # (color, template json) of the selected color
    empty_since: float | None = None
    reported_empty: bool = False
    polls: int = 0

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, daemon=True, name="watch")
        t.start()
        return t

    def _run(self) -> None:
        from tasks.clients import kube_client

        while not self.stop.wait(0.2):
            try:
                seen = look(kube_client(self.kubeconfig), self.namespace, self.name)
            except Exception:  # noqa: BLE001 - an API fault the campaign injected; next poll
                continue
            for inv, detail in self.judge(seen, time.monotonic()):
                self.violate(inv, detail)

    def judge(self, seen: Seen, now: float) -> list[tuple[str, str]]:
        """I1 and I2 on one look at ``now`` (monotonic seconds): the violations it shows, given the looks
        before it (the selected color's template, since when it has had no Ready endpoints)."""
        if seen.color is None or seen.parked:
            self.selected, self.empty_since, self.reported_empty = None, None, False
            return []
        self.polls += 1
        found = []
        if self.selected and self.selected[0] == seen.color and self.selected[1] != seen.template:
            found.append(("I2", f"the pod template of live color {seen.color} changed while selected"))
        self.selected = (seen.color, seen.template)
        if seen.ready:
            self.empty_since, self.reported_empty = None, False
        elif self.empty_since is None:
            self.empty_since = now
        elif now - self.empty_since > self.grace_s and not self.reported_empty:
            self.reported_empty = True
            found.append(("I1", f"the live Service selects {seen.color} with no Ready endpoints for "
                                f"{now - self.empty_since:.1f} s"))
        return found


# ---- the campaign ------------------------------------------------------------------------------------

class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = Path(tempfile.mkdtemp(prefix="campaign-"))
        self.violations: list[tuple[str, str, int]] = []  # (invariant, detail, op index)
        self.log: list[str] = []
        self.kinds: Counter[str] = Counter()
        self.op_index = 0
        self.sb = None
        self.sbc = None
        self.lease_s = 0.0
        self.bad_revisions: list[str] = []
        self.harness_errors: list[str] = []  # the campaign's own failures (not the product's): listed apart
        self.took: dict[str, list[float]] = {}  # seconds each finished operation took, by kind

    # -- bookkeeping
    def violate(self, inv: str, detail: str) -> None:
        self.violations.append((inv, detail, self.op_index))
        seen = sum(1 for v in self.violations if v[0] == inv and v[1] == detail)
        if seen <= 3:  # the log keeps the first few of each kind; the count keeps them all
            self.note(f"VIOLATION {inv}: {detail}" + (" (further ones counted, not logged)" if seen == 3 else ""))

    def note(self, text: str) -> None:
        line = f"[{self.op_index:>3}] {text}"
        self.log.append(line)
        if self.args.verbose:
            print(line, flush=True)

    # -- setup
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({"PREFECT_API_URL": self.prefect.api, "PREFECT_LOGGING_LEVEL": "WARNING",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(self.work / "client"),
                    "PYTHONPATH": str(ROOT)})
        return env

    def setup(self) -> None:
        import yaml

        # Hold proxy pods (the image park_model renders) run as local processes of this package, as in the demo.
        os.environ.setdefault("SANDBOX_LOCAL_IMAGES", "ghcr.io/llm-fleet/llm-fleet:*")
        os.environ.setdefault("LLM_FLEET_IMAGE", "ghcr.io/llm-fleet/llm-fleet:campaign")
        os.environ.update({"LLM_FLEET_POLL_INITIAL_S": "0.05", "LLM_FLEET_POLL_MAX_S": "0.2",
                           "LLM_FLEET_TIME_SCALE": str(self.args.time_scale),
                           "LLM_FLEET_KUBE_DIR": str(self.work / "kube")})
        if self.args.env:
            for line in Path(self.args.env).read_text().splitlines():
                line = line.strip().removeprefix("export ").strip()
                if line and not line.startswith("#") and "=" in line:
                    k, _, v = line.partition("=")
                    os.environ[k] = v.strip().strip("'\"")
        else:
            from bench._support import start_sandbox

            self.sb = start_sandbox(self.args.time_scale)
            os.environ["LLM_FLEET_KUBE_DIR"] = str(self.work / "kube")
        from sandbox.client import SandboxClient
        from tasks.settings import reload_settings

        reload_settings()
        self.sbc = SandboxClient(os.environ["LLM_FLEET_SANDBOX_URL"])
        self.prefect = PrefectServer(self.work / "prefect")
        self.prefect.start()
        os.environ["PREFECT_API_URL"] = self.prefect.api  # this process too (else Prefect starts its own server)

        base = yaml.safe_load((ROOT / self.args.spec).read_text())
        base["cluster"]["project"] = f"campaign-{uuid.uuid4().hex[:8]}"
        pool = base["accelerator"].setdefault("pool", {})
        hpa = base.get("autoscaling")
        if hpa:  # room for both colors at the HPA's maximum, and the other model
            hpa["max_replicas"] = min(int(hpa.get("max_replicas", 3)), 3)
            hpa["min_replicas"] = min(int(hpa.get("min_replicas", 1)), hpa["max_replicas"])
        if hasattr(self.sbc, "preempt_node"):
            base["accelerator"]["spot"] = True  # GCE preempts only Spot VMs: a fault kind
            # ... and a spot model runs >= 2 replicas (the spec refuses one unless it accepts the gap; seed 2
            # found that gap as I3 violations: clients refused until the only replica's replacement loaded)
            if not hpa:
                base["replicas"] = max(2, int(base.get("replicas", 1)))
        per_model = max(int(base.get("replicas", 1)), int((hpa or {}).get("max_replicas", 1)))
        pool.update({"min_nodes": 0, "max_nodes": max(6, 3 * per_model), "initial_nodes": 1})
        base["release"] = {**base.get("release", {}),
                           "pre_promotion": {"requests": 4, "concurrency": 2},
                           "post_promotion": {"requests": 4, "window": "20s", "interval": "10s"},
                           "scale_down_delay": "10s"}
        base.pop("schedule", None)
        base["hold"] = {**base.get("hold", {}), "timeout": "60s"}  # a held request past it: 503 + Retry-After
        self.spec = base
        other = json.loads(json.dumps(base))
        other["name"] = f"{base['name']}-b"
        if base["accelerator"].get("spot") and not hpa:  # no load on it: one replica, its gap accepted
            other.update(replicas=1, on_spot_preemption="accept_gap")
        self.spec_path, self.other_path = self.work / "model.yaml", self.work / "other.yaml"
        self.spec_path.write_text(yaml.safe_dump(base))
        self.other_path.write_text(yaml.safe_dump(other))
        self.model_id = base["model"]["id"] if isinstance(base["model"], dict) else base["model"]
        self.namespace = base.get("namespace", "default")

        res = self.op("provision", self.spec_path, fault=None)
        if not res["ok"]:
            raise RuntimeError(f"setup provision failed: {res}")
        from manifests.spec import parse_spec
        from tasks.gke import get_credentials

        c = parse_spec(base).cluster
        location = c.location
        with contextlib.suppress(Exception):
            from targets.gke.provision import find_cluster

            location = find_cluster(parse_spec(base))[0]
        self.kubeconfig = get_credentials.fn(project=c.project, location=location, name=c.name)
        # What an operator installs first where the spec needs it (ingress-nginx, the metrics adapter)
        from tasks.clients import kube_client
        from tests.flows.prereqs import install_prerequisites

        install_prerequisites(base, kube_client(self.kubeconfig))
        for path in (self.spec_path, self.other_path):
            res = self.op("deploy", path, fault=None)
            if not res["ok"]:
                raise RuntimeError(f"setup deploy failed: {res}")
        from tasks.locks import LEASE_S

        self.lease_s = LEASE_S
        self.other_up = True
        self.load = Load(self._live_url(), self.model_id, self.args.threads, self.violate, self.args.rate)
        self.load.start()
        self.watch = Watch(self.kubeconfig, self.namespace, base["name"], self.violate)
        self.watch.start()

    def _live_url(self) -> str:
        want = f"{self.namespace}/{self.spec['name']}"
        for _ in range(100):
            state = self.sbc.state()
            for c in [*(state.get("clusters_kube") or {}).values(), state.get("kube") or {}]:
                port = (c.get("service_ports") or {}).get(want)
                if port:
                    return f"http://127.0.0.1:{port['port']}"
            time.sleep(0.1)
        raise RuntimeError(f"no loopback address for Service {want}")

    # -- running operations
    def _forkserver(self) -> Any:
        """The fork server, started with the operations' environment (Prefect reads it at import)."""
        if getattr(self, "_ctx", None) is None:
            import multiprocessing

            env = self._env()
            for k in [k for k in os.environ if k.startswith("PREFECT_")]:
                os.environ.pop(k)
            os.environ.update(env)
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(PRELOAD)
        return self._ctx

    def start_op(self, op: str, path: Path, revision: str | None = None) -> subprocess.Popen | OpProcess:
        if not self.args.fresh_processes:
            self.op_count = getattr(self, "op_count", 0) + 1
            log = self.work / "ops" / f"{self.op_count:04d}-{op}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            return OpProcess(self._forkserver(), op, str(path), revision, log)
        argv = [sys.executable, str(ROOT / "bench/campaign.py"), "--run-op", op, "--spec-file", str(path)]
        if revision:
            argv += ["--revision", revision]
        return subprocess.Popen(argv, cwd=ROOT, env=self._env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def finish(self, proc: subprocess.Popen | OpProcess, op: str, timeout: float) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it ended (and was reaped) just now
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return {"ok": False, "stuck": True, "error": f"{op} ran over {timeout:.0f} s", "stderr": err[-800:]}
        for line in reversed(out.splitlines()):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
        return {"ok": False, "error": f"{op} exited {proc.returncode}", "stderr": err[-800:]}

    def op(self, op: str, path: Path, *, revision: str | None = None, fault: str | None = None) -> dict[str, Any]:
        t0 = time.monotonic()
        res = self.finish(self.start_op(op, path, revision), op, self.args.op_timeout)
        self.took.setdefault(op, []).append(time.monotonic() - t0)
        self.note(f"{op}{' ' + revision[:8] if revision else ''} ({fault or 'no fault'}): "
                  f"{'ok' if res['ok'] else res.get('error')} in {time.monotonic() - t0:.1f} s")
        if res.get("stuck"):
            self.violate("I5", f"{op} waited past {self.args.op_timeout:.0f} s (a lock whose holder is gone?)")
        return res

    # -- the walk
    def step(self) -> None:
        choices = [(k, w) for k, w in MENU if k != "spot_preempt" or hasattr(self.sbc, "preempt_node")]
        kind = self.rng.choices([k for k, _ in choices], weights=[w for _, w in choices])[0]
        # Parked under constant load: the hold proxy has asked for a wake; mostly it is granted next (the
        # deployment trigger's wake_model run), sometimes the walk goes on with the model parked.
        if kind not in ("park", "wake", "probe_storm", "other_cycle") and self._parked_safe() and self.rng.random() < 0.8:
            kind = "wake"
        self.kinds[kind] += 1
        try:
            getattr(self, f"do_{kind}")()
        except Exception as exc:  # noqa: BLE001 - the campaign's own step failed: reported, the walk goes on
            self.harness_errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            self.note(f"HARNESS {kind}: {type(exc).__name__}: {exc}")
        self.check_policy()

    def flow_op(self) -> tuple[str, str | None]:
        """A random flow operation on the model (for faults to wrap)."""
        op = self.rng.choice(FLOW_OPS)
        if op == "release_good":
            return "release", self.sbc.push_revision(self.model_id, title="campaign: good")
        if op == "release_bad":
            return "release", self._bad_revision()
        return op, None

    def _bad_revision(self) -> str:
        sha = self.sbc.push_revision(self.model_id, title="campaign: broken weights")
        self.sbc.add_behavior(revision=sha, mode=self.rng.choice(BAD_MODES))
        self.bad_revisions.append(sha)
        return sha

    def do_release_good(self) -> None:
        self.op("release", self.spec_path, revision=self.sbc.push_revision(self.model_id, title="campaign: good"))

    def do_release_bad(self) -> None:
        self.op("release", self.spec_path, revision=self._bad_revision(), fault="a bad revision")

    def do_rollback(self) -> None:
        self.op("rollback", self.spec_path)

    def do_park(self) -> None:
        self.op("park", self.spec_path)

    def do_wake(self) -> None:
        self.op("wake", self.spec_path)

    def do_deploy(self) -> None:
        self.op("deploy", self.spec_path)

    def do_other_cycle(self) -> None:
        """Teardown of another model in the same pool (or its deploy, when it is gone)."""
        self.op("teardown" if self.other_up else "deploy", self.other_path, fault="other model")
        self.other_up = not self.other_up

    def lease_holder(self) -> str:
        from kubernetes import client as k8s
        from kubernetes.client.rest import ApiException

        from tasks.clients import kube_client
        from tasks.locks import lease_name

        try:
            lease = k8s.CoordinationV1Api(kube_client(self.kubeconfig)).read_namespaced_lease(
                lease_name(self._spec_obj()), self.namespace)
        except ApiException:
            return ""
        return (lease.spec.holder_identity or "") if lease.spec else ""

    def _spec_obj(self):
        from manifests.spec import parse_spec

        return parse_spec(self.spec)

    def _watch_dead_holder(self, pid: int, killed_at: float) -> None:
        """I5: a holder that was killed keeps the model's Lease no longer than the lease duration."""
        def run() -> None:
            while (dead_for := time.monotonic() - killed_at) < self.lease_s + 75:
                holder = self.lease_holder()
                if f":{pid}:" not in holder:
                    self.note(f"the killed holder's lock was free after {dead_for:.1f} s")
                    return
                if problem := dead_holder_problem(holder=holder, pid=pid, dead_for=dead_for, lease_s=self.lease_s):
                    self.violate("I5", problem)
                    return
                time.sleep(0.5)
        threading.Thread(target=run, daemon=True, name="i5").start()

    def _typical(self, op: str) -> float:
        """How long this kind of operation has taken so far (any kind before the first; 8 s before any)."""
        past = self.took.get(op) or [t for v in self.took.values() for t in v] or [8.0]
        return sum(past) / len(past)

    def do_kill(self) -> None:
        op, rev = self.flow_op()
        proc = self.start_op(op, self.spec_path, rev)
        # a random moment inside the operation: a share of how long this kind of op has taken so far (a
        # fixed 2-12 s fell after the end of most ops once they stopped paying for their imports)
        delay = self.rng.uniform(0.1, 0.9) * self._typical(op)
        killed = False
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it ended (and was reaped) just now
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
        proc.communicate()
        self.note(f"{op} killed after {delay:.1f} s" if killed else f"{op} ended before its kill at {delay:.1f} s")
        self._watch_dead_holder(proc.pid, time.monotonic())
        res = self.op("deploy" if op == "deploy" else "rollback" if op == "release" else op, self.spec_path,
                      fault="after a kill")
        if not res["ok"] and "LockTimeout" in str(res.get("error")):
            self.violate("I5", f"the next operation after a killed holder timed out on the lock: {res['error']}")

    def do_prefect_restart(self) -> None:
        op, rev = self.flow_op()
        proc = self.start_op(op, self.spec_path, rev)
        time.sleep(self.rng.uniform(0.1, 0.9) * self._typical(op))  # while it runs, as for a kill
        self.prefect.restart()
        self.note("prefect server restarted")
        self.finish(proc, op, self.args.op_timeout)
        res = self.op(op if op != "release" else "rollback", self.spec_path, fault="after a Prefect restart")
        if not res["ok"] and "LockTimeout" in str(res.get("error")):
            self.violate("I5", f"after a Prefect server restart the lock stayed taken: {res['error']}")

    def do_api_burst(self) -> None:
        kind = self.rng.choice(("429", "503", "reset"))
        rule: dict[str, Any] = {"service": "kube", "count": self.rng.randint(2, 6)}
        if kind == "reset":
            rule["action"] = "reset"
        elif kind == "429":
            rule.update(action=None, status=429, headers={"Retry-After": "1"})
        else:
            rule["status"] = 503
        added = self.sbc.add_fault(**{k: v for k, v in rule.items() if v is not None})
        op, rev = self.flow_op()
        self.op(op, self.spec_path, revision=rev, fault=f"API {kind} burst")
        with contextlib.suppress(Exception):
            self.sbc.remove_fault(added["id"])

    def do_endpoint_lag(self) -> None:
        lag = getattr(self.sbc, "set_endpoint_lag", None)
        if lag is None:
            self.note("endpoint lag: not in this sandbox; a plain release instead")
            self.do_release_good()
            return
        seconds = self.rng.choice((1.0, 5.0, 15.0))
        lag(seconds)
        try:
            self.op("release", self.spec_path, revision=self.sbc.push_revision(self.model_id, title="campaign: good"),
                    fault=f"endpoint lag {seconds:g} s")
        finally:
            lag(1.0)

    def do_probe_storm(self) -> None:
        """Park, then probes and scrapes with kube-probe/GoogleHC/Prometheus agents: the model stays parked."""
        import httpx

        if not self.parked():
            res = self.op("park", self.spec_path, fault="before a probe storm")
            if not res["ok"]:
                return
        self.load.stop.set()  # the storm alone: client requests would (rightly) wake it
        for t in self.load.threads:
            t.join(timeout=130)
        url = self._live_url()
        sent = 0
        with httpx.Client(base_url=url, timeout=5) as http:
            for i in range(60):
                agent = PROBE_AGENTS[i % len(PROBE_AGENTS)]
                path = "/metrics" if agent.startswith("Prometheus") else self.rng.choice(("/health", "/", "/v1/models"))
                with contextlib.suppress(httpx.HTTPError):
                    http.get(path, headers={"User-Agent": agent})
                    sent += 1
        time.sleep(2.0)
        if not self.parked() or self.gpu_pods():
            self.violate("I4", f"a probe and scrape storm ({sent} requests) woke the parked model")
        self.note(f"probe storm: {sent} probe/scrape requests while parked")
        old = self.load
        self.load = Load(url, self.model_id, self.args.threads, self.violate, self.args.rate)
        self.load.sent, self.load.outcomes = old.sent, old.outcomes  # one count for the whole campaign
        self.load.start()

    def do_concurrent(self) -> None:
        a, ra = self.flow_op()
        b, rb = self.flow_op()
        pa, pb = self.start_op(a, self.spec_path, ra), self.start_op(b, self.spec_path, rb)
        out_a, out_b = self.finish(pa, a, self.args.op_timeout), self.finish(pb, b, self.args.op_timeout)
        self.note(f"concurrent {a} / {b}: {out_a.get('ok')} / {out_b.get('ok')}")
        for o, res in ((a, out_a), (b, out_b)):
            if res.get("stuck"):
                self.violate("I5", f"concurrent {o} waited past {self.args.op_timeout:.0f} s")

    def do_spot_preempt(self) -> None:
        """GCE preempts a Spot GPU node under a serving pod (30 s notice); then a release runs."""
        core, _ = self._core()
        serving = {p.spec.node_name for p in self.gpu_pods() if p.spec.node_name}
        nodes = [n.metadata.name for n in core.list_node().items
                 if (n.metadata.labels or {}).get("cloud.google.com/gke-spot") == "true"]
        node = next((n for n in nodes if n in serving), nodes[0] if nodes else None)
        if node:
            self.sbc.preempt_node(node)  # type: ignore[attr-defined]
        self.op("release", self.spec_path, revision=self.sbc.push_revision(self.model_id, title="campaign: good"),
                fault=f"spot preemption of {node}" if node else "no spot node to preempt")

    # -- cluster reads
    def _core(self):
        from kubernetes import client as k8s

        from tasks.clients import kube_client

        return k8s.CoreV1Api(kube_client(self.kubeconfig)), k8s.AppsV1Api(kube_client(self.kubeconfig))

    def _parked_safe(self) -> bool:
        try:
            return self.parked()
        except Exception:  # noqa: BLE001 - an injected API fault: not parked as far as the walk knows
            return False

    def parked(self) -> bool:
        core, _ = self._core()
        svc = core.read_namespaced_service(self.spec["name"], self.namespace)
        return PARK_RECORD in (svc.metadata.annotations or {})

    def gpu_pods(self, name: str | None = None) -> list[Any]:
        core, _ = self._core()
        pods = core.list_namespaced_pod(self.namespace, label_selector=f"{MODEL_LABEL}={name or self.spec['name']}")
        return [p for p in pods.items if not p.metadata.deletion_timestamp and any(
            "nvidia.com/gpu" in ((c.resources.limits or {}) if c.resources else {}) for c in p.spec.containers)]

    def _gpu_nodes(self) -> list[str]:
        core, _ = self._core()
        return [n.metadata.name for n in core.list_node().items
                if "cloud.google.com/gke-accelerator" in (n.metadata.labels or {})]

    def check_policy(self, settle_s: float = 20.0) -> None:
        """I4: once settled, the GPU pods and nodes are what the policy calls for."""
        deadline = time.monotonic() + settle_s
        problem = ""
        while time.monotonic() < deadline:
            problem = self._policy_problem()
            if not problem:
                return
            time.sleep(0.5)
        self.violate("I4", problem)

    def _policy_problem(self) -> str:
        try:
            core, apps = self._core()
            svc = core.read_namespaced_service(self.spec["name"], self.namespace)
            pods = self.gpu_pods()
            other_pods = self.gpu_pods(f"{self.spec['name']}-b")
            nodes = self._gpu_nodes()
            parked = PARK_RECORD in (svc.metadata.annotations or {})
            live = (svc.spec.selector or {}).get(COLOR_LABEL)
            live_replicas = None
            if live is not None and not parked:
                dep = apps.read_namespaced_deployment(f"{self.spec['name']}-{live}", self.namespace)
                live_replicas = dep.spec.replicas or 0
        except Exception as exc:  # noqa: BLE001
            return f"could not read the cluster: {exc}"
        return policy_problem(parked=parked, selector=svc.spec.selector or {},
                              pods={p.metadata.name: p.metadata.labels.get(COLOR_LABEL) for p in pods},
                              live_replicas=live_replicas, other_pods=len(other_pods), gpu_nodes=len(nodes))

    # -- run
    def run(self) -> int:
        started = time.monotonic()
        try:
            self.setup()
            for i in range(self.args.ops):
                self.op_index = i + 1
                self.step()
        except Exception as exc:  # noqa: BLE001 - reported with the seed
            self.violate("setup", f"{type(exc).__name__}: {exc}")
        finally:
            self.teardown()
        return self.report(time.monotonic() - started)

    def teardown(self) -> None:
        for part in ("watch", "load"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop.set()
        with contextlib.suppress(Exception):
            self.prefect.stop()
        if self.sb is not None:
            with contextlib.suppress(Exception):
                self.sb.stop()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def report(self, wall: float) -> int:
        by_inv = Counter(v[0] for v in self.violations)
        load = getattr(self, "load", None)
        print(f"\ncampaign seed {self.args.seed}: {self.args.ops} ops in {wall:.0f} s "
              f"(time scale {self.args.time_scale}, spec {self.args.spec})")
        print(f"  ops run:              {self.op_index}")
        print(f"  fault kinds:          {len(self.kinds)} — " + ", ".join(f"{k}×{n}" for k, n in sorted(self.kinds.items())))
        if load is not None:
            print(f"  requests sent:        {load.sent} ({dict(load.outcomes)})")
        print(f"  prefect restarts:     {getattr(getattr(self, 'prefect', None), 'restarts', 0)}")
        print(f"  harness errors:       {len(self.harness_errors)}" +
              "".join(f"\n    {e[:200]}" for e in self.harness_errors))
        for inv in ("I1", "I2", "I3", "I4", "I5", "setup"):
            print(f"  violations {inv:<6}     {by_inv.get(inv, 0)}")
        if self.violations:
            print(f"\nreplay: uv run python bench/campaign.py --seed {self.args.seed} --ops {self.args.ops}")
            print("operation log:")
            for line in self.log:
                print("  " + line)
        print(f"seed: {self.args.seed}")
        print(f"violations: {len(self.violations)}")
        return 1 if self.violations else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ops", type=int, default=20)
    p.add_argument("--env", help="a running sandbox's env file (default: start one in this process)")
    p.add_argument("--spec", default=SPEC)
    p.add_argument("--time-scale", type=float, default=0.005)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second per client thread")
    p.add_argument("--op-timeout", type=float, default=240.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--fresh-processes", action="store_true",
                   help="start each operation as a new interpreter (slower: every import again) instead of "
                        "forking it from a server that imported the flows once")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--run-op", help=argparse.SUPPRESS)
    p.add_argument("--spec-file", help=argparse.SUPPRESS)
    p.add_argument("--revision", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.run_op:
        return run_op(args.run_op, args.spec_file, args.revision)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: still stop the servers it started
    return Campaign(args).run()


if __name__ == "__main__":
    sys.exit(main())
