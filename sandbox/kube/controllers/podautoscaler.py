"""The HorizontalPodAutoscaler controller's hook into the work queue.

Mirrors kube-controller-manager ``pkg/controller/podautoscaler``; the controller itself and the
metrics APIs it reads live in ``sandbox.kube.autoscaling`` (imported on first use: it imports this
package's helpers).
"""

from __future__ import annotations

from sandbox.kube.controllers.base import ControllerBase


class HpaHook(ControllerBase):
    """``sync_hpa(ns, name)`` hands the HPA to one ``HpaController`` per cluster."""

    # ---- HPA --------------------------------------------------------------------------------
    def sync_hpa(self, ns: str, name: str) -> None:
        """The HPA controller with its metrics sources lives in sandbox.kube.autoscaling."""
        from sandbox.kube.autoscaling import HpaController

        if getattr(self, "_hpa", None) is None:
            self._hpa = HpaController(self)
        self._hpa.sync(ns, name)
