"""The endpoints controller: each Service's Endpoints list the IPs and ports of the pods its selector matches.

Mirrors kube-controller-manager ``pkg/controller/endpoint`` (``endpoints_controller.go``): Ready pods
under ``addresses``, the others under ``notReadyAddresses``, named target ports resolved from the
pods' container ports, terminating pods left out. EndpointSlices mirror these
(``sandbox.kube.endpointslices``).
"""

from __future__ import annotations

import contextlib

from sandbox.core import HttpError
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import EPS, PODS, SVCS, Obj, is_ready
from sandbox.kube.selectors import match_selector_dict


class EndpointsController(ControllerBase):
    """``sync_endpoints(ns, name)``; Endpoints labelled ``sandbox.llm-fleet.dev/manual`` are left alone."""

    # ---- endpoints --------------------------------------------------------------------------
    def sync_endpoints(self, ns: str, name: str) -> None:
        svc = self.store.get(SVCS, ns, name)
        if svc is None:
            with contextlib.suppress(HttpError):
                ep = self.store.get(EPS, ns, name)
                if ep is not None and not (ep["metadata"].get("labels") or {}).get("sandbox.llm-fleet.dev/manual"):
                    self.store.delete(EPS, ns, name)
            return
        selector = (svc.get("spec") or {}).get("selector")
        if not selector:
            return
        pods, _ = self.store.list(PODS, ns, lambda p: match_selector_dict(selector, p["metadata"].get("labels"))
                                  and bool((p.get("status") or {}).get("podIP"))
                                  and not p["metadata"].get("deletionTimestamp"))
        ready_addrs, not_ready = [], []
        for p in pods:
            addr = {"ip": p["status"]["podIP"], "nodeName": p["spec"].get("nodeName"),
                    "targetRef": {"kind": "Pod", "namespace": ns, "name": p["metadata"]["name"],
                                  "uid": p["metadata"]["uid"]}}
            (ready_addrs if is_ready(p) else not_ready).append(addr)
        ports = []
        for sp in svc["spec"].get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            number = target if isinstance(target, int) else None
            if number is None:
                for p in pods:
                    for c in p["spec"].get("containers") or []:
                        for cp in c.get("ports") or []:
                            if cp.get("name") == target:
                                number = cp.get("containerPort")
                if number is None:
                    try:
                        number = int(target)
                    except (TypeError, ValueError):
                        continue
            port = {"port": number, "protocol": sp.get("protocol", "TCP")}
            if sp.get("name"):
                port["name"] = sp["name"]
            ports.append(port)
        subsets = []
        if (ready_addrs or not_ready) and ports:
            subset: Obj = {}
            if ready_addrs:
                subset["addresses"] = sorted(ready_addrs, key=lambda a: a["ip"])
            if not_ready:
                subset["notReadyAddresses"] = sorted(not_ready, key=lambda a: a["ip"])
            subset["ports"] = ports
            subsets.append(subset)
        live = self.store.get(EPS, ns, name)
        labels = dict(svc["metadata"].get("labels") or {})
        if live is None:
            ep = {"apiVersion": "v1", "kind": "Endpoints",
                  "metadata": {"name": name, "namespace": ns, "labels": labels}}
            if subsets:
                ep["subsets"] = subsets
            with contextlib.suppress(HttpError):
                self.cluster.api.create(EPS, ns, ep)
            return

        def fn(e: Obj) -> Obj | None:
            if e.get("subsets", []) == subsets and (e["metadata"].get("labels") or {}) == labels:
                return None
            if subsets:
                e["subsets"] = subsets
            else:
                e.pop("subsets", None)
            e["metadata"]["labels"] = labels
            return e

        self.store.mutate(EPS, ns, name, fn)
