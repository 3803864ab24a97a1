"""The whole sandbox in one process: every emulator, a control API, the env file and a kubeconfig.

    with Sandbox.running(time_scale=0.01) as sb:
        env = sb.env()            # LLM_FLEET_*, HF_*, SLACK_*, KUBECONFIG, CLOUDSDK_* for the product
        sb.compute.set_stockout("us-central1-a", "nvidia-l4")
        SandboxClient(sb.url).add_fault(service="gke", method="POST", status=503, count=2)

``llm-fleet sandbox up`` calls :func:`main`, which writes ``<state-dir>/env`` and
``<state-dir>/kubeconfig`` and serves until SIGINT/SIGTERM.

Control API (``service="control"``; only fault rules naming ``"control"`` explicitly apply to it, so
a ``"*"`` rule can never lock you out of clearing faults):

=======================================  ============================================================
``GET  /healthz``                        ``{"ok": true}``
``GET  /sandbox/state``                  urls, env, quota used, faults and every emulator's snapshot
``GET  /sandbox/faults``                 fault rules (FaultRule JSON, with ``hits``)
``POST /sandbox/faults``                 add a rule: ``{"service", "method", "path", "status", "count",
                                         "latency", "hang", "body", "headers"}`` → the rule with its id
``DELETE /sandbox/faults[?service=S]``   clear all rules (or one service's)
``DELETE /sandbox/faults/{id}``          remove one rule
``GET/POST/DELETE /sandbox/stockouts``   list / ``{"zone", "accelerator": type|null (every GPU)|"*"
                                         (every VM), "on": true}`` / clear
``GET/POST /sandbox/quota``              quota used (``?project=P``) / ``{"region": null|R, "metric",
                                         "limit", "project": null|P}``
``GET/POST/DELETE /sandbox/behaviors``   model-server behaviors (the runtime's Behaviors: ``{"mode",
                                         "match", "load_seconds", "count", ...}``); ``DELETE .../{id}``
``GET  /sandbox/slack/messages``         messages posted to the Slack emulator (``?channel=C``)
=======================================  ============================================================
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from sandbox.client import SandboxClient
from sandbox.compute import Compute
from sandbox.core import Clock, FaultRule, Faults, HttpError, JsonHandler, SandboxHTTPServer, route, serve
from sandbox.gke import Gke

HF_TOKEN = "hf_sandbox_read"
SLACK_TOKEN = "xoxb-sandbox-token"
GCLOUD_TOKEN = "sandbox-access-token"
KUBE_CONTEXT = "sandbox"


class _ControlFaults:
    """The fault view of the control server: only rules that name ``"control"`` apply."""

    def __init__(self, faults: Faults) -> None:
        self._faults = faults

    @property
    def stop(self) -> threading.Event:
        return self._faults.stop

    def take(self, service: str, method: str, path: str) -> FaultRule | None:
        return self._faults.take("control", method, path, exact=True)


def _quiet_stop(part: Any) -> None:
    if hasattr(part, "stop"):
        with contextlib.suppress(Exception):
            part.stop()


class Sandbox:
    """Every emulator plus the control API, as threads of this process on 127.0.0.1."""

    def __init__(self, *, time_scale: float = 1.0, state_dir: str | os.PathLike[str] | None = None,
                 project: str = "sandbox-project") -> None:
        # The kube/models/hub/slack emulators are built by their own modules; imported here so a
        # missing one fails with a clear ImportError when the sandbox is built, not at import time.
        from sandbox.hub import Hub
        from sandbox.kube import KubeCluster
        from sandbox.models import ModelRuntime
        from sandbox.slack import Slack

        self.project = project
        self.clock = Clock(time_scale)
        self.faults = Faults()
        self.hub = Hub(faults=self.faults, clock=self.clock)
        self.runtime = ModelRuntime(clock=self.clock, faults=self.faults, hub=self.hub)
        self.kube = KubeCluster(clock=self.clock, faults=self.faults, runtime=self.runtime)
        self.compute = Compute(clock=self.clock, faults=self.faults, project=project)
        self.gke = Gke(clock=self.clock, faults=self.faults, compute=self.compute, kube=self.kube)
        self.slack = Slack(faults=self.faults, clock=self.clock, token=SLACK_TOKEN)
        self._given_state_dir = Path(state_dir) if state_dir is not None else None
        self.state_dir: Path | None = self._given_state_dir
        self._tmp_dir: Path | None = None
        self._control: SandboxHTTPServer | None = None
        self._started = False
        self._stop_event = threading.Event()

    # ---- lifecycle -----------------------------------------------------------------------------
    def _parts(self) -> list[Any]:
        """Start order: things others depend on first."""
        return [self.hub, self.runtime, self.kube, self.compute, self.gke, self.slack]

    def start(self) -> Sandbox:
        if self._started:
            return self
        self.faults.stop.clear()
        self._stop_event.clear()
        started: list[Any] = []
        try:
            for part in self._parts():
                if hasattr(part, "start"):
                    part.start()
                started.append(part)
            self._control = serve(ControlHandler, state=self, faults=_ControlFaults(self.faults))  # type: ignore[arg-type]
        except BaseException:
            for part in reversed(started):
                with contextlib.suppress(Exception):
                    part.stop()
            raise
        self._started = True
        if self.state_dir is None:
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="llm-fleet-sandbox-"))
            self.state_dir = self._tmp_dir
        self.state_dir = self.state_dir.resolve()
        self.write_env(self.state_dir)
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.faults.stop.set()  # release requests held by "hang" faults
        self._stop_event.set()
        # each server's shutdown waits out its poll interval: stop them side by side
        stoppers = [threading.Thread(target=_quiet_stop, args=(part,), daemon=True)
                    for part in [self._control, *reversed(self._parts())] if part is not None]
        self._control = None
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(timeout=10)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
            self.state_dir = self._given_state_dir

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @classmethod
    @contextlib.contextmanager
    def running(cls, **kwargs: Any) -> Iterator[Sandbox]:
        """``with Sandbox.running(time_scale=0.01) as sb: ...`` — started, and stopped afterwards."""
        sb = cls(**kwargs)
        sb.start()
        try:
            yield sb
        finally:
            sb.stop()

    # ---- endpoints -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The control API."""
        if self._control is None:
            raise RuntimeError("sandbox is not started")
        return self._control.url

    def client(self) -> SandboxClient:
        """A :class:`~sandbox.client.SandboxClient` of this sandbox's control API."""
        return SandboxClient(self.url)

    def urls(self) -> dict[str, str]:
        return {
            "control": self.url,
            "gke": self.gke.url,
            "compute": self.compute.url,
            "kube": self.kube.url,
            "hub": self.hub.url,
            "slack": self.slack.url,
        }

    def env(self, directory: str | os.PathLike[str] | None = None) -> dict[str, str]:
        """What the product (and users' gcloud/kubectl/huggingface-cli) need to use the sandbox.

        File paths (KUBECONFIG, CLOUDSDK_CONFIG, LLM_FLEET_KUBE_DIR) point into ``directory``
        (default: the state dir, where :meth:`start` writes them).
        """
        if not self._started:
            raise RuntimeError("sandbox is not started")
        d = Path(directory) if directory is not None else self.state_dir
        assert d is not None
        return {
            "LLM_FLEET_SANDBOX_URL": self.url,
            "LLM_FLEET_GKE_ENDPOINT": self.gke.url,
            "LLM_FLEET_COMPUTE_ENDPOINT": self.compute.url,
            "LLM_FLEET_GCP_AUTH": "anonymous",
            # the sandbox's cluster endpoints (127.0.0.1:PORT) speak plain http
            "LLM_FLEET_CLUSTER_SCHEME": "http",
            "LLM_FLEET_KUBE_DIR": str(d / "kube"),
            "LLM_FLEET_TIME_SCALE": repr(self.clock.time_scale),
            "LLM_FLEET_SLACK_API_URL": self.slack.url + "/api/",
            "SLACK_BOT_TOKEN": self.slack.token,
            "HF_ENDPOINT": self.hub.url,
            "HF_TOKEN": HF_TOKEN,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "KUBECONFIG": str(d / "kubeconfig"),
            "GOOGLE_CLOUD_PROJECT": self.project,
            "CLOUDSDK_CORE_PROJECT": self.project,
            "CLOUDSDK_AUTH_ACCESS_TOKEN": GCLOUD_TOKEN,
            "CLOUDSDK_CONFIG": str(d / "gcloud"),
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_CONTAINER": self.gke.url + "/",
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": self.compute.url + "/compute/v1/",
            # `gcloud container clusters create` first asks Service Usage whether the API is enabled
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE": self.gke.url + "/",
        }

    def kubeconfig(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": KUBE_CONTEXT, "cluster": {"server": self.kube.url}}],
            "users": [{"name": KUBE_CONTEXT, "user": {}}],
            "contexts": [{"name": KUBE_CONTEXT, "context": {"cluster": KUBE_CONTEXT, "user": KUBE_CONTEXT,
                                                            "namespace": "default"}}],
            "current-context": KUBE_CONTEXT,
        }

    def write_env(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``<dir>/env`` (``export K=V``), ``<dir>/kubeconfig`` and a gcloud config dir."""
        d = Path(directory).resolve()
        d.mkdir(parents=True, exist_ok=True)
        env = self.env(d)
        (d / "kube").mkdir(exist_ok=True)
        gcloud = d / "gcloud"
        (gcloud / "configurations").mkdir(parents=True, exist_ok=True)
        (gcloud / "active_config").write_text("default")
        (gcloud / "configurations" / "config_default").write_text(
            f"[core]\nproject = {self.project}\ndisable_usage_reporting = True\n"
            "[component_manager]\ndisable_update_check = True\n")
        kubeconfig = d / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(self.kubeconfig(), sort_keys=False))
        kubeconfig.chmod(0o600)
        lines = ["# llm-fleet sandbox: `set -a; . ./env; set +a` (or `source env`) to use it", ""]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        path = d / "env"
        path.write_text("\n".join(lines) + "\n")
        return path

    # ---- inspection --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        def snap(part: Any) -> Any:
            fn = getattr(part, "snapshot", None)
            if fn is None:
                return None
            try:
                return fn()
            except Exception as exc:  # one broken snapshot must not hide the others
                return {"error": repr(exc)}

        return {
            "project": self.project,
            "time_scale": self.clock.time_scale,
            "state_dir": str(self.state_dir) if self.state_dir else None,
            "urls": self.urls(),
            "env": self.env(),
            "quota_used": self.compute.quota_used(),
            "faults": self.faults.list(),
            "compute": snap(self.compute),
            "gke": snap(self.gke),
            "kube": snap(self.kube),
            "runtime": snap(self.runtime),
            "hub": snap(self.hub),
            "slack": snap(self.slack),
        }

    def banner(self) -> str:
        env_file = (self.state_dir or Path(".")) / "env"
        rows = "\n".join(f"  {k:<8} {v}" for k, v in self.urls().items())
        return (
            f"llm-fleet sandbox is up (project {self.project}, time scale {self.clock.time_scale:g})\n"
            f"{rows}\n\n"
            f"Use it from another shell:\n"
            f"  set -a; . {env_file}; set +a        # or: source {env_file}\n"
            f"  kubectl get pods -A\n"
            f"  gcloud container clusters list\n"
            f"  gcloud compute regions describe us-central1\n"
            f"  (gcloud clusters create/get-credentials add an https context for the cluster to this\n"
            f"   kubeconfig; the sandbox API is plain http: `kubectl config use-context sandbox` afterwards)\n"
            f"  curl -s {self.url}/sandbox/state | head\n\n"
            f"Faults:   curl -XPOST {self.url}/sandbox/faults -d '{{\"service\":\"gke\",\"status\":503,\"count\":2}}'\n"
            f"Stockout: curl -XPOST {self.url}/sandbox/stockouts -d '{{\"zone\":\"us-central1-a\",\"accelerator\":\"nvidia-l4\"}}'\n"
            f"Stop with Ctrl-C."
        )

    def run_forever(self, *, out: Any = None) -> int:
        """Start (if needed), print how to use the sandbox, serve until SIGINT/SIGTERM, stop cleanly."""
        out = out or sys.stdout
        self.start()
        installed: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                installed[sig] = signal.signal(sig, lambda *_: self._stop_event.set())
        try:
            print(self.banner(), file=out, flush=True)
            while not self._stop_event.wait(0.5):
                pass
        finally:
            for sig, handler in installed.items():
                signal.signal(sig, handler)
            self.stop()
            print("llm-fleet sandbox stopped.", file=out, flush=True)
        return 0

    def request_stop(self) -> None:
        """Make :meth:`run_forever` return (thread-safe)."""
        self._stop_event.set()


# ---- control API ---------------------------------------------------------------------------------

_ROUTES: list = []
_FAULT_FIELDS = {f.name for f in dataclasses.fields(FaultRule)} - {"id", "hits"}


class ControlHandler(JsonHandler):
    service = "control"
    routes = _ROUTES
    server: SandboxHTTPServer

    @property
    def sb(self) -> Sandbox:
        return self.server.state


def _body_dict(h: ControlHandler) -> dict[str, Any]:
    body = h.json_body()
    if not isinstance(body, dict):
        raise HttpError(400, "request body must be a JSON object")
    return body


@route(_ROUTES, "GET", r"/healthz")
def _healthz(h: ControlHandler):
    return {"ok": True}


@route(_ROUTES, "GET", r"/sandbox/state")
def _state(h: ControlHandler):
    return h.sb.state()


@route(_ROUTES, "GET", r"/sandbox/faults")
def _faults(h: ControlHandler):
    return {"faults": h.sb.faults.list()}


@route(_ROUTES, "POST", r"/sandbox/faults")
def _add_fault(h: ControlHandler):
    body = _body_dict(h)
    unknown = set(body) - _FAULT_FIELDS
    if unknown:
        raise HttpError(400, f"unknown fault field(s): {', '.join(sorted(unknown))}; valid: "
                             f"{', '.join(sorted(_FAULT_FIELDS))}")
    if "service" not in body:
        raise HttpError(400, "a fault needs a service: gke, compute, kube, hub, slack, model, control or *")
    try:
        rule = h.sb.faults.add(**body)
    except Exception as exc:  # bad regex, bad types
        raise HttpError(400, f"bad fault rule: {exc}") from exc
    return 201, rule.to_dict()


@route(_ROUTES, "DELETE", r"/sandbox/faults")
def _clear_faults(h: ControlHandler):
    h.sb.faults.clear(h.q("service") or None)
    return {"faults": h.sb.faults.list()}


@route(_ROUTES, "DELETE", r"/sandbox/faults/(?P<rule_id>[^/]+)")
def _remove_fault(h: ControlHandler, rule_id: str):
    if not h.sb.faults.remove(rule_id):
        raise HttpError(404, f"no fault rule {rule_id}")
    return {"removed": rule_id}


@route(_ROUTES, "GET", r"/sandbox/stockouts")
def _stockouts(h: ControlHandler):
    return {"stockouts": h.sb.compute.snapshot()["stockouts"]}


@route(_ROUTES, "POST", r"/sandbox/stockouts")
def _set_stockout(h: ControlHandler):
    body = _body_dict(h)
    if not body.get("zone"):
        raise HttpError(400, "a stockout needs a zone (and optionally an accelerator)")
    try:
        h.sb.compute.set_stockout(body["zone"], body.get("accelerator"), bool(body.get("on", True)))
    except ValueError as exc:
        raise HttpError(400, str(exc)) from exc
    return {"stockouts": h.sb.compute.snapshot()["stockouts"]}


@route(_ROUTES, "DELETE", r"/sandbox/stockouts")
def _clear_stockouts(h: ControlHandler):
    h.sb.compute.clear_stockouts()
    return {"stockouts": []}


@route(_ROUTES, "GET", r"/sandbox/quota")
def _quota(h: ControlHandler):
    return h.sb.compute.quota_used(project=h.q("project") or None)


@route(_ROUTES, "POST", r"/sandbox/quota")
def _set_quota(h: ControlHandler):
    body = _body_dict(h)
    if not body.get("metric") or "limit" not in body:
        raise HttpError(400, "a quota needs a metric and a limit (and a region, or null for project-wide)")
    project = body.get("project") or None
    try:
        h.sb.compute.set_quota(body.get("region"), body["metric"], float(body["limit"]), project=project)
    except (ValueError, TypeError) as exc:
        raise HttpError(400, str(exc)) from exc
    return {"project": project or h.sb.project, "region": body.get("region"), "metric": body["metric"],
            **h.sb.compute.quota(body.get("region"), body["metric"], project=project)}


def _behaviors(h: ControlHandler) -> Any:
    behaviors = getattr(h.sb.runtime, "behaviors", None)
    if behaviors is None:
        raise HttpError(501, "this model runtime has no behaviors registry")
    return behaviors


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@route(_ROUTES, "GET", r"/sandbox/behaviors")
def _list_behaviors(h: ControlHandler):
    b = _behaviors(h)
    listing = b.list() if hasattr(b, "list") else getattr(b, "rules", [])
    return {"behaviors": _jsonable(listing)}


@route(_ROUTES, "POST", r"/sandbox/behaviors")
def _add_behavior(h: ControlHandler):
    body = _body_dict(h)
    b = _behaviors(h)
    try:
        added = b.add(**body)
    except (TypeError, ValueError, KeyError) as exc:
        raise HttpError(400, f"bad behavior: {exc}") from exc
    return 201, _jsonable(added) if added is not None else body


@route(_ROUTES, "DELETE", r"/sandbox/behaviors")
def _clear_behaviors(h: ControlHandler):
    b = _behaviors(h)
    b.clear()
    return {"behaviors": []}


@route(_ROUTES, "DELETE", r"/sandbox/behaviors/(?P<rule_id>[^/]+)")
def _remove_behavior(h: ControlHandler, rule_id: str):
    if not _behaviors(h).remove(rule_id):
        raise HttpError(404, f"no behavior {rule_id}")
    return {"removed": rule_id}


@route(_ROUTES, "GET", r"/sandbox/slack/messages")
def _slack_messages(h: ControlHandler):
    return {"messages": h.sb.slack.messages(h.q("channel") or None)}


# ---- CLI -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``llm-fleet sandbox up``: run the sandbox in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="llm-fleet sandbox up",
                                     description="Run the loopback GCP/GKE/Kubernetes/HF/Slack sandbox.")
    parser.add_argument("--state-dir", default=os.environ.get("LLM_FLEET_SANDBOX_DIR", ".llm-fleet/sandbox"),
                        help="where to write env, kubeconfig and the gcloud config (default: %(default)s)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="cloud delays are multiplied by this (0.01: a 5-minute cluster create takes 3 s)")
    parser.add_argument("--project", default="sandbox-project", help="the sandbox's GCP project id")
    args = parser.parse_args(argv)
    if args.time_scale <= 0:
        parser.error("--time-scale must be > 0")
    t0 = time.monotonic()
    sb = Sandbox(time_scale=args.time_scale, state_dir=args.state_dir, project=args.project)
    sb.start()
    print(f"(started in {time.monotonic() - t0:.2f} s; env written to {Path(args.state_dir).resolve() / 'env'})",
          flush=True)
    return sb.run_forever()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
