"""The main job: sandbox + Prefect server (with UI) + deployed flows + a lifecycle, printed as it goes.

Everything runs on 127.0.0.1. The flows run in a real Prefect worker, triggered through the Prefect
API exactly as `prefect deployment run` would, and reach the sandbox only through real clients.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str) -> None:
    print(text, flush=True)


def _prefect(*args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "prefect", *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed:\n{res.stdout}\n{res.stderr}")


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _run(name: str, spec: str, env: dict[str, str], timeout: float = 900) -> Any:
    """Trigger a deployment through the Prefect API and wait for its final state."""
    from prefect.deployments import run_deployment

    _say(f"\n▶ {name}  (spec={spec})")
    start = time.monotonic()
    run = run_deployment(name=name, parameters={"spec": spec}, timeout=timeout)
    state = run.state
    _say(f"  {'✓' if state and state.is_completed() else '✗'} {run.name}: {state.name if state else '?'} "
         f"in {time.monotonic() - start:.1f}s")
    if state and not state.is_completed():
        _say(f"  cause: {state.message}")
    return run


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
    from sandbox.app import Sandbox

    state_dir = Path(args.state_dir).resolve()
    if state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)
    spec = str(args.spec)

    _say(f"llm-fleet demo — sandbox time scale {args.time_scale} (cloud delays × {args.time_scale})")
    sandbox = Sandbox(time_scale=args.time_scale, state_dir=state_dir)
    sandbox.start()
    env = {**os.environ, **sandbox.env()}
    env.update({
        "LLM_FLEET_HOME": str(ROOT), "LLM_FLEET_TIME_SCALE": str(args.time_scale),
        "LLM_FLEET_KUBE_DIR": str(state_dir / "kube"),
        "PREFECT_HOME": str(state_dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    })
    _say(f"✓ sandbox up: {sandbox.env().get('LLM_FLEET_SANDBOX_URL')}  (source {state_dir}/env to use kubectl, gcloud)")

    port = _free_port(4200)
    api = f"http://127.0.0.1:{port}/api"
    env["PREFECT_API_URL"] = api
    procs: list[subprocess.Popen] = []
    log = open(state_dir / "prefect.log", "w")  # noqa: SIM115 - closed in finally
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                       "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=log))
        _wait_http(f"{api}/health", 120, procs[-1])
        _say(f"✓ Prefect server + UI: http://127.0.0.1:{port}")
        _prefect("work-pool", "create", "local", "--type", "process", "--overwrite", env=env)
        _prefect("--no-prompt", "deploy", "--all", env=env)
        _say("✓ flows deployed (prefect.yaml) to work pool 'local'")
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "local",
                                       "--limit", "4"], cwd=ROOT, env=env, stdout=log, stderr=log))
        _say("✓ worker started")

        os.environ.update({"PREFECT_API_URL": api})
        ok = True
        for name in ("provision_cluster/default", "deploy_model/default"):
            run = _run(name, spec, env)
            ok = ok and bool(run.state and run.state.is_completed())
            if not ok:
                break
        for step in ("release_model", "park_model"):
            _say(f"\n… {step}: not built yet (next issues); the lifecycle stops after deploy for now")
        _summarise(spec, env, state_dir)
        _say(f"\nPrefect UI: http://127.0.0.1:{port}  ·  kubectl: `source {state_dir}/env && kubectl get pods -A`")
        if args.keep_running:
            _say("Running until Ctrl-C …")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        log.close()
        sandbox.stop()
