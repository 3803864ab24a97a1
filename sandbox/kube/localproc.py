"""Pods whose image is a "local image" run their ``command`` as a local subprocess.

A generic ability of the sandbox kubelet, for workloads that are plain programs (a proxy, a sidecar):
a container whose image is ``local/<anything>``, or matches a pattern in ``$SANDBOX_LOCAL_IMAGES``
(comma-separated ``fnmatch`` patterns, read at each container start), is started as
``command + args`` (``$(VAR)`` expanded as the kubelet does) in a subprocess of the sandbox:

* it listens on an assigned loopback port given as ``PORT`` (and ``HOST=127.0.0.1``); that port is the
  container's port, so Services route to the pod like to any other;
* its environment is the container's ``env`` (plain values) plus what Kubernetes injects into every
  pod: ``KUBERNETES_SERVICE_HOST/PORT`` (this cluster's API) and, unless ``enableServiceLinks: false``,
  ``<SERVICE>_SERVICE_HOST/PORT`` for each Service of the namespace that exists when it starts — here
  a loopback port routing to that Service's Ready pods (Kubernetes' are the ClusterIP and port);
  ``PATH``/``HOME``/``LANG`` come from the sandbox. ``python``/``python3`` as the command run on the
  sandbox's own interpreter: a local image *is* the sandbox's environment;
* it is Ready when its ``readinessProbe.httpGet`` path answers 2xx/3xx (or its port accepts a
  connection, without a probe); its stdout/stderr are the pod's logs; an exit is a container exit
  (restarts with CrashLoopBackOff like any container); deleting the pod sends SIGTERM, then SIGKILL
  after ``terminationGracePeriodSeconds`` (at most 5 s real).

The emulator knows nothing about what runs: only images, commands, ports and probes.
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from sandbox.core import free_port

LOCAL_PREFIX = "local/"
ENV_PATTERNS = "SANDBOX_LOCAL_IMAGES"
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_LIVE: weakref.WeakSet[LocalProcess] = weakref.WeakSet()
_ROUTES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # KubeCluster -> ServicePorts
_ROUTES_LOCK = threading.Lock()


# Images a Sandbox declared its own (the product image its env file names as LLM_FLEET_IMAGE)
REGISTERED: set[str] = set()


def is_local(image: str) -> bool:
    if image.startswith(LOCAL_PREFIX) or image in REGISTERED:
        return True
    patterns = [p.strip() for p in os.environ.get(ENV_PATTERNS, "").split(",") if p.strip()]
    return any(fnmatch.fnmatchcase(image, p) for p in patterns)


def starter(cluster: Any, pod: dict[str, Any]) -> Callable[..., LocalProcess] | None:
    """The kubelet hook: a start function for ``pod`` if its first container is a local image, else None."""
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    if not is_local(str(containers[0].get("image") or "")):
        return None

    def start(pod: dict[str, Any], *, on_ready: Callable[[], Any] | None = None,
              on_exit: Callable[..., Any] | None = None) -> LocalProcess:
        return LocalProcess(cluster, pod, on_ready=on_ready, on_exit=on_exit)

    return start


def _env_name(service: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", service.upper())


def _service_env(cluster: Any, namespace: str) -> dict[str, str]:
    """Service-link variables, with loopback ports that route like the Service (resolved per request)."""
    from sandbox.kube.controllers import SVCS
    from sandbox.routing import ServicePorts

    with _ROUTES_LOCK:
        routes = _ROUTES.get(cluster)
        if routes is None:
            routes = _ROUTES[cluster] = ServicePorts(cluster, faults=getattr(cluster, "faults", None))
    services, _ = cluster.store.list(SVCS, namespace)
    env: dict[str, str] = {}
    for svc in services:
        name = svc["metadata"]["name"]
        ports = (svc.get("spec") or {}).get("ports") or []
        if not ports or name == "kubernetes":
            continue
        port = routes.open(namespace, name)
        key = _env_name(name)
        env[f"{key}_SERVICE_HOST"] = "127.0.0.1"
        env[f"{key}_SERVICE_PORT"] = str(port)
        for p in ports:
            if p.get("name"):
                env[f"{key}_SERVICE_PORT_{_env_name(p['name'])}"] = str(port)
        env[f"{key}_PORT"] = f"tcp://127.0.0.1:{port}"
    return env


def _project_account(cluster: Any, namespace: str, account: str, *, stopped: threading.Event) -> str | None:
    """The kubelet's projected ServiceAccount volume: ``token`` (a bound token, rewritten at 80 % of its
    lifetime as the kubelet does), ``ca.crt`` and ``namespace``. A real pod reads them at
    ``/var/run/secrets/kubernetes.io/serviceaccount``; a local process gets a private directory instead,
    named by ``$SERVICEACCOUNT_DIR``. None when the cluster has no auth or the account does not exist."""
    auth, tls = getattr(cluster, "auth", None), getattr(cluster, "tls", None)
    if auth is None:
        return None
    try:
        token, expiry = auth.issue_sa_token(namespace, account)
    except Exception:  # noqa: BLE001 - no such ServiceAccount: nothing to mount
        return None
    folder = tempfile.mkdtemp(prefix="llm-fleet-sa-")

    def write(name: str, text: str) -> None:
        fd = os.open(os.path.join(folder, name + ".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))  # readers never see half

    write("token", token)
    write("namespace", namespace)
    if tls is not None:
        pem = tls.ca_pem() if callable(tls.ca_pem) else tls.ca_pem
        write("ca.crt", pem.decode() if isinstance(pem, bytes) else pem)

    def refresh(expiry: float) -> None:
        while not stopped.wait(max(0.05, 0.8 * (expiry - time.time()))):
            if not os.path.isdir(folder):
                return
            with contextlib.suppress(Exception):
                fresh, expiry = auth.issue_sa_token(namespace, account)
                write("token", fresh)

    threading.Thread(target=refresh, args=(expiry,), name=f"localproc-token-{account}", daemon=True).start()
    return folder


def _secret_value(cluster: Any, namespace: str, ref: dict[str, Any]) -> str | None:
    """An env var's ``secretKeyRef`` as the kubelet resolves it: the key's decoded value; None when the
    Secret or key is missing and ``optional: true``; else LookupError with the kubelet's message."""
    import base64

    from sandbox.kube import resources as res

    secret = cluster.store.get(res.BY_KEY[("", "secrets")], namespace, ref.get("name", ""))
    if secret is None:
        if ref.get("optional"):
            return None
        raise LookupError(f'secret "{ref.get("name")}" not found')
    data = secret.get("data") or {}
    if ref.get("key") not in data:
        if ref.get("optional"):
            return None
        raise LookupError(f"couldn't find key {ref.get('key')} in Secret {namespace}/{ref.get('name')}")
    return base64.b64decode(data[ref["key"]]).decode()


class LocalProcess:
    """One container run as a subprocess; the interface the kubelet expects of a model server."""

    def __init__(self, cluster: Any, pod: dict[str, Any], *, on_ready: Callable[[], Any] | None,
                 on_exit: Callable[..., Any] | None) -> None:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        c = (spec.get("containers") or [{}])[0]
        self.namespace, self.name = meta.get("namespace", "default"), meta.get("name", "")
        self.cluster = cluster
        self.port = free_port()
        self.grace = min(5.0, float(spec.get("terminationGracePeriodSeconds", 30)))
        self._on_ready, self._on_exit = on_ready, on_exit
        self._logs: deque[str] = deque(maxlen=2000)
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self.exit_code: int | None = None
        probe = ((c.get("readinessProbe") or {}).get("httpGet") or {})
        self._probe_path = probe.get("path")

        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ", "VIRTUAL_ENV") if k in os.environ}
        kube_port = getattr(cluster, "port", 0)
        env.update({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(kube_port),
                    "HOSTNAME": self.name, "HOST": "127.0.0.1", "PORT": str(self.port)})
        if spec.get("enableServiceLinks", True):
            with contextlib.suppress(Exception):
                env.update(_service_env(cluster, self.namespace))
        for item in c.get("env") or []:
            if "value" in item:
                env[item["name"]] = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), str(item["value"]))
            elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
                try:
                    value = _secret_value(cluster, self.namespace, ref)
                except LookupError as exc:  # the kubelet: CreateContainerConfigError, the container never starts
                    self._proc, self._sa_dir = None, None
                    self._fail(f"CreateContainerConfigError: {exc}")
                    return
                if value is not None:
                    env[item["name"]] = value
        env["PORT"] = str(self.port)  # the assigned port wins over a PORT the container sets
        self._sa_dir: str | None = None
        if spec.get("automountServiceAccountToken", True):
            self._sa_dir = _project_account(cluster, self.namespace, spec.get("serviceAccountName") or "default",
                                            stopped=self._stopped)
            if self._sa_dir is not None:
                env["SERVICEACCOUNT_DIR"] = self._sa_dir
        argv = [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), str(a))
                for a in list(c.get("command") or []) + list(c.get("args") or [])]
        self._proc: subprocess.Popen[str] | None = None
        if not argv:
            self._fail("no command: a local image has no entrypoint of its own; set the container's command")
            return
        exe = argv[0]
        if re.fullmatch(r"python(3(\.\d+)?)?", exe):
            argv[0] = sys.executable
        elif not os.path.isabs(exe) and shutil.which(exe, path=env.get("PATH")) is None:
            self._fail(f'exec: "{exe}": executable file not found in $PATH')
            return
        # The parent-death signal (setpriv, which execs the command in place): a test or demo process killed
        # with SIGKILL takes its pods' processes along instead of leaving them running. The signal follows the
        # thread that forks; pods start on the controller's own thread, which outlives them (stop() stops the
        # pods first).
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            argv = [setpriv, "--pdeathsig=SIGKILL", "--", *argv]
        try:
            self._proc = subprocess.Popen(argv, env=env, cwd=c.get("workingDir") or os.getcwd(),
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        except OSError as exc:
            self._fail(f"exec: {exc}")
            return
        _LIVE.add(self)
        threading.Thread(target=self._pump, name=f"localproc-log-{self.name}", daemon=True).start()
        threading.Thread(target=self._probe, name=f"localproc-probe-{self.name}", daemon=True).start()

    # ---- what the kubelet reads ------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopped.is_set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[str]:
        return list(self._logs)

    def snapshot(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "name": self.name, "port": self.port, "ready": self.ready,
                "pid": self._proc.pid if self._proc else None, "exit_code": self.exit_code, "local": True}

    def stop(self) -> None:
        """Pod deleted or scaled away: SIGTERM, SIGKILL after the grace period; no on_exit callback."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._ready.clear()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=5)
        self._forget()

    # ---- internals -------------------------------------------------------------------------
    def _forget(self) -> None:
        """The cluster's service-link ports close with its last local process."""
        _LIVE.discard(self)
        if self._sa_dir is not None:
            shutil.rmtree(self._sa_dir, ignore_errors=True)
        with _ROUTES_LOCK:
            if any(p.cluster is self.cluster for p in _LIVE):
                return
            routes = _ROUTES.pop(self.cluster, None)
        if routes is not None:
            with contextlib.suppress(Exception):
                routes.stop()

    def _fail(self, message: str) -> None:
        self._logs.append(message)
        self.exit_code = 128

        def report() -> None:
            time.sleep(0.05)  # after start() returned, as a real exec failure would
            if not self._stopped.is_set() and self._on_exit is not None:
                self._on_exit(128, "StartError")

        threading.Thread(target=report, daemon=True).start()

    def _pump(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            self._logs.append(line.rstrip("\n"))
        code = proc.wait()
        self.exit_code = code
        self._ready.clear()
        self._forget()
        if not self._stopped.is_set() and self._on_exit is not None:
            self._on_exit(code, "Completed" if code == 0 else "Error")

    def _probe(self) -> None:
        while not self._stopped.is_set() and self._proc is not None and self._proc.poll() is None:
            if self._answers():
                self._ready.set()
                if self._on_ready is not None:
                    self._on_ready()
                return
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            if self._probe_path is None:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
            try:
                # the kubelet's first readiness probe (sandbox.kube.prober runs the periodic ones), as it sends it
                from sandbox.kube.prober import user_agent

                conn.request("GET", self._probe_path, headers={"User-Agent": user_agent(self.cluster), "Accept": "*/*"})
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        except OSError:
            return False


@atexit.register
def _kill_all() -> None:
    for p in list(_LIVE):
        with contextlib.suppress(Exception):
            p.stop()
