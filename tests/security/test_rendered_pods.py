"""Every pod the product renders passes the Pod Security level its namespace enforces (baseline), and the
hold proxy passes restricted — checked with the sandbox's PSA checks (the API server's rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from manifests import park as P
from manifests.render import POD_SECURITY, namespace, render
from manifests.spec import load_spec
from sandbox.kube.podsecurity import _pod_spec, violations

ROOT = Path(__file__).resolve().parents[2]
SPECS = [p for p in sorted((ROOT / "deployments").glob("*.yaml")) if load_spec(p).target == "gke"]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_rendered_workloads_pass_baseline(path):
    spec = load_spec(path)
    pods = [(o["kind"], o["metadata"]["name"], _pod_spec(o["kind"], o)) for o in render(spec, color="blue")]
    pods.append(("Deployment", "hold", P.hold_proxy_deployment(spec, prefect_api_url=None)["spec"]["template"]["spec"]))
    checked = [(kind, name, violations("baseline", ps)) for kind, name, ps in pods if ps is not None]
    assert checked and all(found == [] for _, _, found in checked), checked
    assert namespace(spec)["metadata"]["labels"].items() >= POD_SECURITY.items()


def test_hold_proxy_passes_restricted():
    spec = load_spec(SPECS[0])
    pod = P.hold_proxy_deployment(spec, prefect_api_url=None)["spec"]["template"]["spec"]
    assert violations("restricted", pod) == []
