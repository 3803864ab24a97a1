"""Controllers of the sandbox cluster: deployments, replica sets, scheduler, kubelet, endpoints, HPA, namespaces.

One worker thread drains a de-duplicated work queue fed by store events (no polling). Cloud delays
(image pull, crash back-off, Autopilot node provisioning, progress deadlines) are timers on the
sandbox ``Clock`` that enqueue work when they fire. Model servers are started through the runtime
(``runtime.start(pod, on_ready=..., on_exit=...)``); their callbacks update the pod directly so
readiness is visible to watchers at once.

One module per component, each a mixin of ``Controller`` (``cluster.controller``):

* ``base``: work queue, timers, event routing (client-go ``util/workqueue``, informer handlers)
* ``events``: core/v1 Events with repeat aggregation (client-go ``tools/record``)
* ``deployment``: ``pkg/controller/deployment``; ``replicaset``: ``pkg/controller/replicaset``
* ``scheduler``: kube-scheduler ``pkg/scheduler``; ``kubelet``: ``pkg/kubelet`` (pods, restarts, logs)
* ``endpoints``: ``pkg/controller/endpoint``; ``namespace``: ``pkg/controller/namespace``
* ``disruption``: ``pkg/controller/disruption``; ``podautoscaler``: the hook into
  ``sandbox.kube.autoscaling`` (``pkg/controller/podautoscaler``)
* ``autopilot``: GKE Autopilot node provisioning and scale-down of idle nodes
* ``common``: resource types and helpers they share (``is_ready``, ``set_condition``)
"""

from __future__ import annotations

from sandbox.kube.controllers.autopilot import AUTOPILOT_LABEL, AutopilotProvisioner
from sandbox.kube.controllers.common import NODES, PODS, SVCS, is_ready, set_condition
from sandbox.kube.controllers.deployment import DeploymentController, template_hash
from sandbox.kube.controllers.disruption import DisruptionController
from sandbox.kube.controllers.endpoints import EndpointsController
from sandbox.kube.controllers.events import EventRecorder
from sandbox.kube.controllers.kubelet import Kubelet, PodRun
from sandbox.kube.controllers.namespace import NamespaceController
from sandbox.kube.controllers.podautoscaler import HpaHook
from sandbox.kube.controllers.replicaset import ReplicaSetController
from sandbox.kube.controllers.scheduler import Scheduler

__all__ = ["AUTOPILOT_LABEL", "NODES", "PODS", "SVCS", "Controller", "PodRun", "is_ready", "set_condition",
           "template_hash"]


class Controller(DeploymentController, ReplicaSetController, Scheduler, Kubelet, EndpointsController,
                 NamespaceController, DisruptionController, HpaHook, AutopilotProvisioner, EventRecorder):
    """Every controller of one sandbox cluster on one work queue (``start()`` / ``stop()`` / ``enqueue``)."""
