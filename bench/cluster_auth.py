"""What GKE-strict auth costs per request: HTTPS + token check + RBAC, and the product's token refresh.

Prints ratios measured in one run (the machine is shared and noisy):

* a kept-alive request as the project owner (Google token, IAM allows) vs as a ServiceAccount (RBAC
  evaluates its Role) — the authorizer's share of a request;
* a request on a fresh connection (TLS handshake each time) vs a kept-alive one;
* the product's client when every call refreshes the Google token first (lifetime below google-auth's
  refresh margin, as in the sandbox's scaled time) vs a token refreshed once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.mean(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200, help="requests per measurement")
    args = parser.parse_args()

    import os

    import httpx
    from kubernetes import client

    from sandbox.app import Sandbox
    from tests.sandbox.kube_support import api_client

    with Sandbox.running(time_scale=1.0) as sb:
        kube = sb.kube
        owner = client.CoreV1Api(api_client(kube))
        admin = client.CoreV1Api(api_client(kube))
        admin.create_namespaced_service_account("default", {"metadata": {"name": "bench"}})
        rbac = client.RbacAuthorizationV1Api(api_client(kube))
        rbac.create_namespaced_role("default", {"metadata": {"name": "bench"}, "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
        rbac.create_namespaced_role_binding("default", {
            "metadata": {"name": "bench"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bench"},
            "subjects": [{"kind": "ServiceAccount", "name": "bench", "namespace": "default"}]})
        sa_token = admin.create_namespaced_service_account_token("bench", "default", {"spec": {}}).status.token
        sa = client.CoreV1Api(api_client(kube, token=sa_token))
        for c in (owner, sa):
            c.list_namespaced_pod("default")  # warm the pools

        google_ms = timed(lambda: owner.list_namespaced_pod("default"), args.n)
        sa_ms = timed(lambda: sa.list_namespaced_pod("default"), args.n)
        token = kube.auth.google.issue("bench@example.com", scaled=False)[0]
        ctx = kube.tls.client_context()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=kube.url, verify=ctx, headers=headers) as kept:
            kept.get("/api/v1/namespaces/default/pods")
            kept_ms = timed(lambda: kept.get("/api/v1/namespaces/default/pods"), args.n)

        def fresh() -> None:
            with httpx.Client(base_url=kube.url, verify=ctx, headers=headers) as one:
                one.get("/api/v1/namespaces/default/pods")

        fresh_ms = timed(fresh, max(20, args.n // 5))

        # the product's client: ADC from the env file, refresh hook on every request
        os.environ.update(sb.env())
        from tasks.clients import write_kubeconfig
        from tasks.settings import reload_settings

        reload_settings()
        path = write_kubeconfig(project="p", location="l", cluster="bench",
                                endpoint=kube.url.removeprefix("https://"), ca_cert_b64=kube.tls.ca_b64)
        from tasks.clients import kube_client

        product = client.CoreV1Api(kube_client(path))
        sb.tokens.lifetime_s = 60.0  # under google-auth's 225 s refresh margin: every call refreshes
        product.list_namespaced_pod("default")
        refresh_ms = timed(lambda: product.list_namespaced_pod("default"), max(20, args.n // 5))
        sb.tokens.lifetime_s = 36000.0
        product.api_client.fleet_token.get(force=True)
        cached_ms = timed(lambda: product.list_namespaced_pod("default"), args.n)

    print(f"kept-alive list pods, Google identity (IAM)   {google_ms:7.2f} ms")
    print(f"kept-alive list pods, ServiceAccount (RBAC)   {sa_ms:7.2f} ms   ratio {sa_ms / google_ms:.2f}x")
    print(f"httpx kept-alive                              {kept_ms:7.2f} ms")
    print(f"httpx new connection (TLS handshake)          {fresh_ms:7.2f} ms   ratio {fresh_ms / kept_ms:.2f}x")
    print(f"product client, token cached                  {cached_ms:7.2f} ms")
    print(f"product client, token refreshed every call    {refresh_ms:7.2f} ms   ratio {refresh_ms / cached_ms:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
