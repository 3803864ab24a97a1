"""discovery.k8s.io/v1 EndpointSlices, kept by the endpointslice controller from each Service's Endpoints.

One slice per Service named ``<service>-<suffix>`` with label ``kubernetes.io/service-name`` and
``endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io``; each endpoint carries
``conditions.ready/serving/terminating`` and its pod as ``targetRef`` (kube-controller-manager
``pkg/controller/endpointslice``). Consumers such as Gateway/Ingress controllers read these, not Endpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Any

from sandbox.core import HttpError
from sandbox.kube import resources as res

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
SLICES = res.BY_KEY[("discovery.k8s.io", "endpointslices")]
SVCS = res.BY_KEY[("", "services")]
SERVICE_LABEL = "kubernetes.io/service-name"


def _name(ns: str, svc: str) -> str:
    return f"{svc}-{hashlib.sha256(f'{ns}/{svc}'.encode()).hexdigest()[:5]}"


def slice_for(endpoints: Obj, svc: Obj) -> Obj:
    ns, name = endpoints["metadata"]["namespace"], endpoints["metadata"]["name"]
    eps, ports = [], []
    for subset in endpoints.get("subsets") or []:
        for ready, key in ((True, "addresses"), (False, "notReadyAddresses")):
            for a in subset.get(key) or []:
                ep: Obj = {"addresses": [a["ip"]], "conditions": {"ready": ready, "serving": ready,
                                                                   "terminating": False}}
                if a.get("nodeName"):
                    ep["nodeName"] = a["nodeName"]
                if a.get("targetRef"):
                    ep["targetRef"] = a["targetRef"]
                eps.append(ep)
        ports = [{k: p[k] for k in ("name", "port", "protocol") if k in p} for p in subset.get("ports") or []]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": _name(ns, name), "namespace": ns,
                         "labels": {SERVICE_LABEL: name,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                                              "uid": svc["metadata"]["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "addressType": "IPv4", "endpoints": eps, "ports": ports}


class EndpointSlices:
    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        cluster.subscribe(self.on_event)

    def on_event(self, etype: str, obj: Obj) -> None:
        if obj.get("kind") != "Endpoints":
            return
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        store, api = self.cluster.store, self.cluster.api
        live = store.get(SLICES, ns, _name(ns, name))
        svc = store.get(SVCS, ns, name)
        if etype == "DELETED" or svc is None:
            if live is not None:
                with contextlib.suppress(HttpError):
                    store.delete(SLICES, ns, _name(ns, name))
            return
        want = slice_for(obj, svc)
        with contextlib.suppress(HttpError):
            if live is None:
                api.create(SLICES, ns, want)
            elif (live.get("endpoints"), live.get("ports")) != (want["endpoints"], want["ports"]):
                api.update(SLICES, ns, want["metadata"]["name"], {**live, "endpoints": want["endpoints"],
                                                                  "ports": want["ports"]})
