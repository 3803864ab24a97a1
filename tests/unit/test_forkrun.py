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
