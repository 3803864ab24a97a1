"""GKE emulator: the container v1 REST API as ``google.cloud.container_v1`` (``transport="rest"``) and
``gcloud container`` send it.

Clusters and node pools are long-running operations with realistic (time-scaled) durations. Nodes
are real ``Node`` objects in the cluster's Kubernetes API (``kube.add_node`` / ``kube.remove_node``),
and every node holds Compute quota (the GPU metric — ``PREEMPTIBLE_*`` for spot/preemptible — plus
``CPUS``, and the project-wide ``GPUS_ALL_REGIONS`` / ``CPUS_ALL_REGIONS``) for as long as it exists.

Semantics mirrored from GKE:

* create replies at once with an ``Operation`` (PENDING → RUNNING → DONE); ``GET .../operations/OP``
  polls it and the sandbox-only ``POST .../operations/OP:wait`` blocks until it is done (bounded).
* duplicate create → 409 ALREADY_EXISTS, missing → 404 NOT_FOUND, bad input → 400 INVALID_ARGUMENT,
  a mutation while another operation holds the cluster/pool → 400 FAILED_PRECONDITION.
* quota is checked when a cluster or node pool is created: a shortfall is a synchronous 403 with GKE's
  "Insufficient regional quota to satisfy request: resource "NVIDIA_L4_GPUS" ..." text. A resize that
  runs out of quota, and any create/resize in a stocked-out zone, finishes the operation DONE with an
  ``error`` ("... [ZONE_RESOURCE_POOL_EXHAUSTED] ..." / "... [QUOTA_EXCEEDED] ..."); the nodes that
  could start exist, the pool is ERROR (or RUNNING_WITH_ERROR when some zones worked).
* an accelerator a zone does not offer, or a machine type that cannot carry it → 400.
* node counts (``initialNodeCount``, ``setSize``, autoscaling bounds) are per zone, as in GKE.
* Autopilot clusters have no node pools; the kube emulator provisions their nodes itself.

Each cluster has its own Kubernetes API server, as on GKE: with ``kube_factory`` (what the composed
sandbox passes) ``kube_factory(project, location, name)`` builds and starts one when the cluster is
created (before the create call returns, so ``endpoint`` is set from the first reply on), node pools
add and remove their nodes there, Autopilot provisioning and the cluster autoscaler act on it alone, and
deleting the cluster releases it (``kube_release(project, location, name, kube)``, default
``kube.stop()``) before the delete operation is DONE: its API server refuses connections and its model
servers are gone. Without a factory every cluster shares the one ``kube`` given (unit tests).

The cluster ``endpoint`` is that Kubernetes API as ``127.0.0.1:PORT``, served over HTTPS with a
certificate signed by the cluster's own CA, which ``masterAuth.clusterCaCertificate`` returns (base64
PEM), as on GKE; it wants a bearer token (``sandbox.kube.auth``).

The package, one module per area: :mod:`~sandbox.gke.clusters`, :mod:`~sandbox.gke.node_pools`,
:mod:`~sandbox.gke.nodes` (Node objects, instance groups, quota), :mod:`~sandbox.gke.autopilot`,
:mod:`~sandbox.gke.cluster_kube` (each cluster's Kubernetes API), :mod:`~sandbox.gke.operations`,
:mod:`~sandbox.gke.versions` (serverConfig), :mod:`~sandbox.gke.machines`, :mod:`~sandbox.gke.state`,
:mod:`~sandbox.gke.common` (wire conventions), assembled into :class:`Gke` in :mod:`~sandbox.gke.service`;
the cluster autoscaler in :mod:`~sandbox.gke.autoscaler`, the REST surface in :mod:`~sandbox.gke.rest`.
"""

# Import circle, on purpose and inside this component only: service.Gke is assembled from one mixin per API
# area (clusters, node pools, nodes, autopilot, autoscaler, rest) and they import the service's shared state
# back. tests/unit/test_imports.py checks no circle leaves a sandbox component.

from sandbox.gke.autoscaler import (
    AUTOPILOT_NODE_LABEL,
    ClusterAutoscaler,
    parse_quantity,
    pod_fits_template,
    pod_requests,
)
from sandbox.gke.machines import machine_shape
from sandbox.gke.rest import GkeHandler
from sandbox.gke.service import GKE_DELAYS, Gke
from sandbox.gke.versions import CHANNELS, DEFAULT_CHANNEL, IMAGE_TYPES, VERSIONS

__all__ = [
    "AUTOPILOT_NODE_LABEL",
    "CHANNELS",
    "DEFAULT_CHANNEL",
    "GKE_DELAYS",
    "IMAGE_TYPES",
    "VERSIONS",
    "ClusterAutoscaler",
    "Gke",
    "GkeHandler",
    "machine_shape",
    "parse_quantity",
    "pod_fits_template",
    "pod_requests",
]
