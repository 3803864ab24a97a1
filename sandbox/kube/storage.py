"""PersistentVolumeClaims the way GKE's persistentvolume-controller and CSI provisioners treat them.

* A claim starts Pending. Its StorageClass must exist, or it stays Pending with a ``ProvisioningFailed``
  event ``storageclass.storage.k8s.io "X" not found`` (re-tried when the class appears, e.g. when the
  Filestore CSI add-on is enabled and creates ``standard-rwx``).
* ``volumeBindingMode: WaitForFirstConsumer`` (every GKE class but ``standard``): the claim waits with a
  ``WaitForFirstConsumer`` event until the scheduler places a pod that uses it, then is provisioned.
* The provisioner must support the access mode: Persistent Disk (``pd.csi.storage.gke.io``) cannot be
  ``ReadWriteMany`` ("specified multi writer with mount access type"); Filestore can, and rounds small
  requests up to the tier's minimum (1 TiB for ``standard``/basic HDD, 2.5 TiB for ``premium``).
* The scheduler does not place a pod whose claim is missing or cannot bind.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from sandbox.kube import resources as res
from sandbox.kube.defaults import parse_quantity

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
PVCS = res.BY_KEY[("", "persistentvolumeclaims")]
SCS = res.BY_KEY[("storage.k8s.io", "storageclasses")]
PD, FILESTORE = "pd.csi.storage.gke.io", "filestore.csi.storage.gke.io"
# Cloud seconds a CSI provisioner takes to create the volume: a PD in seconds, a Filestore instance in
# minutes ("Filestore instance creation can take several minutes", GKE Filestore CSI docs).
PROVISION_SECONDS = {PD: 5.0, FILESTORE: 240.0}
FILESTORE_MIN = {"standard": "1Ti", "BASIC_HDD": "1Ti", "premium": "2560Gi", "BASIC_SSD": "2560Gi",
                 "enterprise": "1Ti", "zonal": "1Ti"}


def _claims(pod: Obj) -> list[str]:
    return [v["persistentVolumeClaim"]["claimName"] for v in (pod.get("spec") or {}).get("volumes") or []
            if (v.get("persistentVolumeClaim") or {}).get("claimName")]


class Storage:
    """Subscribes to the cluster's changes; the scheduler asks ``blocked(pod)`` / ``bind_for(pod, node)``."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self._provisioning: set[str] = set()  # claim uids whose volume is being created
        cluster.subscribe(self.on_event)

    # ---- events --------------------------------------------------------------------------------
    def on_event(self, etype: str, obj: Obj) -> None:
        kind = obj.get("kind")
        if kind == "PersistentVolumeClaim" and etype == "ADDED":
            self.sync(obj["metadata"]["namespace"], obj["metadata"]["name"])
        elif kind == "StorageClass" and etype == "ADDED":
            claims, _ = self.cluster.store.list(PVCS, None, lambda c: (c.get("status") or {}).get("phase") == "Pending")
            for c in claims:
                self.sync(c["metadata"]["namespace"], c["metadata"]["name"])
            self.cluster.controller.enqueue(("schedule",))

    def _event(self, claim: Obj, etype: str, reason: str, message: str, component: str) -> None:
        self.cluster.controller.event(claim, etype, reason, message, component=component)

    def sync(self, ns: str, name: str) -> None:
        claim = self.cluster.store.get(PVCS, ns, name)
        if claim is None or (claim.get("status") or {}).get("phase") != "Pending":
            return
        sc_name = (claim.get("spec") or {}).get("storageClassName")
        sc = self.cluster.store.get(SCS, "", sc_name) if sc_name else None
        if sc is None:
            self._event(claim, "Warning", "ProvisioningFailed",
                        f'storageclass.storage.k8s.io "{sc_name}" not found' if sc_name else
                        "no persistent volumes available for this claim and no storage class is set",
                        "persistentvolume-controller")
            return
        if sc.get("volumeBindingMode") == "WaitForFirstConsumer":
            self._event(claim, "Normal", "WaitForFirstConsumer",
                        "waiting for first consumer to be created before binding", "persistentvolume-controller")
            return
        self.provision(claim, sc)

    # ---- provisioning ----------------------------------------------------------------------------
    def _refusal(self, claim: Obj, sc: Obj) -> str | None:
        modes = set((claim.get("spec") or {}).get("accessModes") or [])
        if sc.get("provisioner") == PD and "ReadWriteMany" in modes:
            return (f'failed to provision volume with StorageClass "{sc["metadata"]["name"]}": rpc error: code = '
                    "InvalidArgument desc = VolumeCapabilities is invalid: specified multi writer with mount "
                    "access type")
        return None

    def provision(self, claim: Obj, sc: Obj, *, announce: bool = True) -> bool:
        provisioner = sc.get("provisioner", "")
        refusal = self._refusal(claim, sc)
        meta = claim["metadata"]
        if refusal:
            self._event(claim, "Warning", "ProvisioningFailed", refusal,
                        f"{provisioner}_sandbox-controller")
            return False
        requested = (((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        capacity = requested
        if provisioner == FILESTORE:
            floor = FILESTORE_MIN.get((sc.get("parameters") or {}).get("tier", "standard"), "1Ti")
            if (parse_quantity(requested) or 0) < (parse_quantity(floor) or 0):
                capacity = floor
        volume = f"pvc-{meta['uid']}"
        if announce:
            self._event(claim, "Normal", "Provisioning", f'External provisioner is provisioning volume for claim '
                        f'"{meta["namespace"]}/{meta["name"]}"', f"{provisioner}_sandbox-controller")

        def bind(c: Obj) -> Obj | None:
            if (c.get("status") or {}).get("phase") != "Pending":
                return None
            c["spec"]["volumeName"] = volume
            c["status"] = {"phase": "Bound", "accessModes": list(c["spec"].get("accessModes") or []),
                           "capacity": {"storage": capacity}}
            ann = c["metadata"].setdefault("annotations", {})
            ann["pv.kubernetes.io/bind-completed"] = "yes"
            ann["pv.kubernetes.io/bound-by-controller"] = "yes"
            ann["volume.beta.kubernetes.io/storage-provisioner"] = provisioner
            ann["volume.kubernetes.io/storage-provisioner"] = provisioner
            return c

        with contextlib.suppress(Exception):
            self.cluster.store.mutate(PVCS, meta["namespace"], meta["name"], bind)
        self._event(claim, "Normal", "ProvisioningSucceeded", f"Successfully provisioned volume {volume}",
                    f"{provisioner}_sandbox-controller")
        return True

    # ---- scheduler hooks -------------------------------------------------------------------------
    def blocked(self, pod: Obj) -> str | None:
        """Why the scheduler cannot place ``pod`` because of its claims (None: it may)."""
        ns = pod["metadata"]["namespace"]
        for name in _claims(pod):
            claim = self.cluster.store.get(PVCS, ns, name)
            if claim is None:
                return f'persistentvolumeclaim "{name}" not found'
            if (claim.get("status") or {}).get("phase") == "Bound":
                continue
            sc_name = (claim.get("spec") or {}).get("storageClassName")
            sc = self.cluster.store.get(SCS, "", sc_name) if sc_name else None
            if sc is None:
                return f'storageclass.storage.k8s.io "{sc_name}" not found'
            if sc.get("volumeBindingMode") != "WaitForFirstConsumer":
                return "pod has unbound immediate PersistentVolumeClaims"
            if self._refusal(claim, sc):
                return f'persistentvolumeclaim "{name}" cannot be provisioned: {self._refusal(claim, sc)}'
        return None

    def bind_for(self, pod: Obj) -> bool:
        """The scheduler chose a node (its PreBind step): provision the pod's delayed-binding claims. False
        while a volume is still being created — the pod stays Pending and is scheduled again once bound."""
        ns = pod["metadata"]["namespace"]
        ready = True
        for name in _claims(pod):
            claim = self.cluster.store.get(PVCS, ns, name)
            if claim is None or (claim.get("status") or {}).get("phase") == "Bound":
                continue
            sc = self.cluster.store.get(SCS, "", (claim.get("spec") or {}).get("storageClassName") or "")
            if sc is None:
                continue
            ready = False
            uid = claim["metadata"]["uid"]
            if uid in self._provisioning:
                continue
            self._provisioning.add(uid)
            provisioner = sc.get("provisioner", "")
            self._event(claim, "Normal", "Provisioning", f'External provisioner is provisioning volume for claim '
                        f'"{ns}/{name}"', f"{provisioner}_sandbox-controller")

            def done(claim: Obj = claim, sc: Obj = sc, uid: str = uid) -> None:
                self._provisioning.discard(uid)
                live = self.cluster.store.get(PVCS, claim["metadata"]["namespace"], claim["metadata"]["name"])
                if live is not None and live["metadata"]["uid"] == uid:
                    self.provision(live, sc, announce=False)
                self.cluster.controller.enqueue(("schedule",))

            self.cluster.clock.call_later(PROVISION_SECONDS.get(provisioner, 5.0), done)
        return ready
