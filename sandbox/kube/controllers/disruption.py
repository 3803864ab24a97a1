"""The disruption controller: each PodDisruptionBudget's status (healthy pods, disruptions allowed).

Mirrors kube-controller-manager ``pkg/controller/disruption`` (``disruption.go``): expected pods =
the pods its selector matches, healthy = the Ready ones, desired from ``minAvailable`` or
``maxUnavailable`` (percentages round up), and the ``DisruptionAllowed`` condition.
"""

from __future__ import annotations

from sandbox.core import now_rfc3339
from sandbox.kube.controllers.base import ControllerBase
from sandbox.kube.controllers.common import PDBS, PODS, Obj, int_or_percent, is_ready, set_condition
from sandbox.kube.selectors import match_label_selector


class DisruptionController(ControllerBase):
    """``sync_pdbs(ns)`` updates every PodDisruptionBudget of a namespace."""

    # ---- PDB --------------------------------------------------------------------------------
    def sync_pdbs(self, ns: str) -> None:
        pdbs, _ = self.store.list(PDBS, ns)
        if not pdbs:
            return
        pods, _ = self.store.list(PODS, ns, lambda p: not p["metadata"].get("deletionTimestamp"))
        for pdb in pdbs:
            spec = pdb.get("spec") or {}
            sel = spec.get("selector")
            matched = [p for p in pods if sel is not None and match_label_selector(sel, p["metadata"].get("labels"))]
            expected = len(matched)
            healthy = sum(1 for p in matched if is_ready(p))
            if "minAvailable" in spec:
                desired = int_or_percent(spec["minAvailable"], expected, True)
            elif "maxUnavailable" in spec:
                desired = max(0, expected - int_or_percent(spec["maxUnavailable"], expected, True))
            else:
                desired = expected
            allowed = max(0, healthy - desired)
            now = now_rfc3339()

            def fn(o: Obj, expected: int = expected, healthy: int = healthy, desired: int = desired,
                   allowed: int = allowed, now: str = now) -> Obj | None:
                old = o.get("status") or {}
                conds = set_condition(old.get("conditions") or [], "DisruptionAllowed",
                                      "True" if allowed else "False",
                                      "SufficientPods" if allowed else "InsufficientPods", "", now, probe=False)
                st = {"currentHealthy": healthy, "desiredHealthy": desired, "disruptionsAllowed": allowed,
                      "expectedPods": expected, "observedGeneration": o["metadata"].get("generation", 1),
                      "conditions": conds}
                if old == st:
                    return None
                o["status"] = st
                return o

            self.store.mutate(PDBS, ns, pdb["metadata"]["name"], fn)
