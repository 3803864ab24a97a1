"""The chat playground in a real browser (Debian's Chromium driven headless by Playwright) on the sandbox.

Each bundled seed is deployed with ``expose.playground`` by the real flows; the page is reached the way a
user reaches it — ``kubectl port-forward service/<name>-playground`` (seeds 001, 000) or the model's GCE
Ingress address at ``/playground`` (seed 004) — a prompt is typed, and the streamed answer is read off
the page. The parked case parks the model, types a prompt, and the page shows the wait until the wake
(the test plays the deployment trigger, as tests/flows/test_park.py does) answers it.
Screenshots for the README/docs are written when ``LLM_FLEET_SCREENSHOTS`` names a directory.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.core import free_port
from tests.flows.conftest import spec_dict

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a closed network (machines/python.md): no background fetches to Google's hosts.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
EVENT = "llm-fleet.model.wake-requested"
# A 1x1 PNG: the sandbox's PaliGemma captions what the prompt carries, as TGI's router receives it.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.long]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is not installed: scripts/bootstrap installs it"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=[*FLAGS, "--host-resolver-rules=MAP *.example.com 127.0.0.1"])
        yield b
        b.close()


def deploy(data: dict) -> str:
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from tasks.clients import kube_client
    from tasks.gke import get_credentials
    from tests.flows.prereqs import install_prerequisites

    provision_cluster(spec=data)
    c = data["cluster"]
    install_prerequisites(data, kube_client(get_credentials.fn(project=c["project"], location=c["location"],
                                                               name=c.get("name", "llm-fleet"))))
    return deploy_model(spec=data)["kubeconfig"]


@contextlib.contextmanager
def port_forward(kubeconfig: str, namespace: str, service: str, port: int) -> Iterator[str]:
    """``kubectl port-forward service/<service> <local>:<port>``, as a user opens a ClusterIP Service."""
    local = free_port()
    home = tempfile.mkdtemp(prefix="tests-kubectl-")
    proc = subprocess.Popen(["kubectl", f"--kubeconfig={kubeconfig}", f"--cache-dir={home}/cache", "-n", namespace,
                             "port-forward", f"service/{service}", f"{local}:{port}"],
                            env={**os.environ, "HOME": home}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"Forwarding from 127.0.0.1:{local}"), (line, proc.stderr.read())
        yield f"http://127.0.0.1:{local}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def wait_for(pred, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := pred():
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, url: str):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_function("document.getElementById('color').textContent !== '…'")
    return page


def ask(page, prompt: str, *, image: bytes | None = None, timeout_s: float = 90, shot_wait: str | None = None,
        on_wait=None) -> dict:
    """Type a prompt, send it, wait for the answer: its state, text, figures, how many token events the page
    received (streamed pieces) and the last wait message it showed before them. With ``shot_wait``: once the
    page shows the wait, a screenshot, then ``on_wait()``."""
    page.evaluate("""() => { window.__waited = ''; const log = document.getElementById('log');
        new MutationObserver(() => { const w = [...log.querySelectorAll('.assistant .wait')].pop();
          if (w && w.textContent.includes('waking')) window.__waited = w.textContent; })
          .observe(log, {subtree: true, childList: true, characterData: true}); }""")
    n = page.locator(".turn.assistant").count()
    if image is not None:
        page.set_input_files("#image", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": image}])
    page.fill("#prompt", prompt)
    page.click("#send")
    turn = page.locator(".turn.assistant").nth(n)
    turn.wait_for()
    if shot_wait is not None:  # the page while the prompt is held
        page.wait_for_function("window.__waited !== ''", timeout=timeout_s * 1000)
        shot(page, shot_wait)
        if on_wait is not None:
            on_wait()
    page.wait_for_function(f"['done', 'error'].includes(document.querySelectorAll('.turn.assistant')[{n}]"
                           f".dataset.state)", timeout=timeout_s * 1000)
    return {"state": turn.get_attribute("data-state"), "answer": turn.locator(".answer").inner_text(),
            "meta": turn.locator(".meta").inner_text() if turn.locator(".meta").count() else "",
            "pieces": int(turn.get_attribute("data-pieces") or 0), "waited": page.evaluate("window.__waited")}


def shot(page, name: str) -> None:
    if folder := os.environ.get("LLM_FLEET_SCREENSHOTS"):
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def playground_pods(kubeconfig: str, spec: dict) -> list[dict]:
    from tasks import k8s

    return k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace=spec.get("namespace",
                               "default"), label_selector=f"app.kubernetes.io/instance={spec['name']},"
                                                          "app.kubernetes.io/component=playground")


def ready(pods: list[dict]) -> list[dict]:
    """The pods, once every one is Ready (else an empty list)."""
    ok = all(any(c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions") or [])
             for p in pods)
    return pods if pods and ok else []


def gpu_pods(kubeconfig: str, spec: dict) -> list[dict]:
    from tasks import k8s

    return k8s.list_objects.fn(kubeconfig=kubeconfig, api_version="v1", kind="Pod", namespace=spec.get("namespace",
                               "default"), label_selector=f"app.kubernetes.io/instance={spec['name']},"
                                                          "app.kubernetes.io/component=model-server")


def wake_events(spec: dict) -> list[dict]:
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"name": [EVENT]}, "resource": {"id": [f"llm-fleet.model.{spec['name']}"]},
                       "occurred": {"since": "2020-01-01T00:00:00Z"}}, "limit": 50}
    resp = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
    resp.raise_for_status()
    return resp.json().get("events", [])


def test_seed001_vllm_answers_a_typed_prompt_streamed_and_after_a_park_the_page_waits_for_the_wake(browser):
    from flows.deploy_model import deploy_model
    from flows.park import park_model, wake_model
    from flows.teardown import teardown

    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml", hold__image="local/llm-fleet", hold__timeout=120)
    kubeconfig = deploy(spec)
    model_pods = {p["metadata"]["uid"] for p in gpu_pods(kubeconfig, spec)}
    assert playground_pods(kubeconfig, spec) == []
    spec["expose"]["playground"] = True  # turned on for a serving model: added in place, the model untouched
    out = deploy_model(spec=spec)
    assert out["playground"].startswith("kubectl port-forward")  # it answers, and the run says where
    assert {p["metadata"]["uid"] for p in gpu_pods(kubeconfig, spec)} == model_pods
    (pod,) = ready(playground_pods(kubeconfig, spec))
    assert "nvidia.com/gpu" not in str(pod["spec"]["containers"][0].get("resources"))
    with port_forward(kubeconfig, "default", f"{spec['name']}-playground", 80) as url:
        page = open_page(browser, url + "/")
        assert page.inner_text("#model") == spec["model"]["id"]
        assert page.inner_text("#color") == "blue" and page.inner_text("#state") == "serving"
        assert len(page.inner_text("#revision")) == 12  # the commit the live color runs, from the cluster
        assert "/v1/chat/completions" in page.inner_text("#api")
        got = ask(page, "What is Kubernetes?")
        assert got["state"] == "done" and got["answer"].strip(), got
        assert got["pieces"] > 3, got  # streamed token by token, not one block
        assert "time to first token" in got["meta"] and "tokens/s" in got["meta"]
        shot(page, "playground-gemma-vllm.png")

        assert park_model(spec=spec, reason="test")["parked"] is True
        page.reload()
        wait_for(lambda: page.inner_text("#state").startswith("parked"), "the page to show the model parked")
        seen = {e["id"] for e in wake_events(spec)}
        woke: dict = {}
        shown = threading.Event()
        # Playwright's sync API belongs to this thread: the deployment trigger is played from another one, once
        # the page shows the wait (a wake that answers before a loaded machine's browser drew it leaves nothing
        # to see; the promise is the wait shown while the model is parked, then the answer)
        trigger = threading.Thread(target=lambda: (
            wait_for(lambda: [e for e in wake_events(spec) if e["id"] not in seen], "a wake event", 60),
            shown.wait(100), woke.update(wake_model(spec=spec, reason="event"))))
        trigger.start()
        answer = ask(page, "What is a GPU?", timeout_s=100, shot_wait="playground-gemma-parked.png",
                     on_wait=shown.set)
        trigger.join(120)
        assert woke.get("woken"), woke
        assert answer["state"] == "done" and answer["answer"].strip(), answer
        assert "parked and waking up" in answer["waited"], answer  # the page showed the wait, then the answer

    teardown(spec=spec, dry_run=False)
    assert playground_pods(kubeconfig, spec) == []


def test_seed004_through_its_gce_ingress_address(browser):
    from kubernetes import client

    from tasks.clients import kube_client

    spec = spec_dict("mistral-7b-vllm-spot.yaml", expose__playground=True, hold__image="local/llm-fleet")
    kubeconfig = deploy(spec)
    api = kube_client(kubeconfig)

    def address():
        ing = client.NetworkingV1Api(api).read_namespaced_ingress(spec["name"], spec["namespace"])
        lb = (ing.status.load_balancer.ingress or []) if ing.status and ing.status.load_balancer else []
        return lb[0] if lb else None

    addr = wait_for(address, "the Ingress address")
    page = open_page(browser, f"http://{addr.ip}:{addr.ports[0].port}/playground/")
    assert page.inner_text("#model") == spec["model"]["id"] and page.inner_text("#color") == "blue"
    got = ask(page, "San Francisco is a")
    assert got["state"] == "done" and got["answer"].strip() and got["pieces"] > 3, got
    # Mistral-7B-v0.1 has no chat template: the page says it asks the completions API, as seed 004's client does.
    # The server learns that from the first answer, and the page shows it at its next refresh of /api/info (it
    # asks right after an answer; under load that fetch lands after `ask` returns).
    page.wait_for_function("document.getElementById('api').textContent.includes('/v1/completions')", timeout=15000)
    shot(page, "playground-mistral-ingress.png")


def test_seed000_paligemma_on_tgi_captions_an_uploaded_image(browser):
    spec = spec_dict("paligemma2-tgi-autopilot.yaml", expose__playground=True, hold__image="local/llm-fleet")
    kubeconfig = deploy(spec)
    with port_forward(kubeconfig, spec.get("namespace", "default"), f"{spec['name']}-playground", 80) as url:
        base = "/playground/" if spec.get("expose", {}).get("ingress") else "/"
        page = open_page(browser, url + base)
        assert page.is_visible("#image")  # a VLM: the page offers an image
        assert "/generate_stream" in page.inner_text("#api")
        got = ask(page, "caption en", image=PNG)
        assert got["state"] == "done", got
        assert got["answer"].strip().startswith("image of"), got
        shot(page, "playground-paligemma-tgi.png")
