"""Thin tasks, one per GKE (container v1) verb. Creates are get-or-create; waits back off, never spin."""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from prefect import task

from manifests.errors import FleetError
from tasks.clients import (
    cluster_manager,
    google_access_token,
    google_retry,
    write_kubeconfig,
)
from tasks.fencing import fence
from tasks.progress import WaitProgress, operation_progress
from tasks.retry import task_retries
from tasks.settings import get_settings


def _parent(project: str, location: str) -> str:
    return f"projects/{project}/locations/{location}"


def _to_dict(message) -> dict[str, Any]:
    return type(message).to_dict(message, preserving_proto_field_name=True, use_integers_for_enums=False)


def _call_opts() -> dict[str, Any]:
    return {"retry": google_retry(), "timeout": get_settings().call_timeout_s}


class OperationFailed(FleetError):
    def __init__(self, operation: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.message = message


class _NotDone(Exception):
    pass


def _poll(fn, *, what: str):
    """Poll ``fn`` with exponential backoff + jitter until it stops raising _NotDone."""
    s = get_settings()
    retry = Retry(predicate=if_exception_type(_NotDone), initial=s.poll_initial_s, maximum=s.poll_max_s,
                  multiplier=1.5, timeout=s.operation_timeout_s)
    try:
        return retry(fn)()
    except gexc.RetryError as exc:
        raise FleetError(f"{what} did not finish within {s.operation_timeout_s:g} s",
                         "check the GKE console; rerun the flow to resume waiting") from exc


@task(**task_retries())
def get_server_config(*, project: str, location: str) -> dict[str, Any]:
    client = cluster_manager()
    return _to_dict(client.get_server_config(name=_parent(project, location), **_call_opts()))


@task(**task_retries())
def get_cluster(*, project: str, location: str, name: str) -> dict[str, Any] | None:
    try:
        cluster = cluster_manager().get_cluster(name=f"{_parent(project, location)}/clusters/{name}",
                                                **_call_opts())
    except gexc.NotFound:
        return None
    return _to_dict(cluster)


@task(**task_retries())
def list_clusters(*, project: str, location: str = "-") -> list[dict[str, Any]]:
    resp = cluster_manager().list_clusters(parent=_parent(project, location), **_call_opts())
    return [_to_dict(c) for c in resp.clusters]


@task(**task_retries())
def create_cluster(*, project: str, location: str, body: dict[str, Any]) -> str | None:
    """Start creating a cluster; returns the operation name, or None when it already exists."""
    from google.cloud import container_v1

    try:
        op = cluster_manager().create_cluster(parent=_parent(project, location),
                                              cluster=container_v1.Cluster(body), **_call_opts())
    except gexc.Conflict:
        return None  # a previous (crashed) run created it: converge instead of making a second one
    return op.name


@task(**task_retries())
def delete_cluster(*, project: str, location: str, name: str) -> str | None:
    try:
        op = cluster_manager().delete_cluster(name=f"{_parent(project, location)}/clusters/{name}", **_call_opts())
    except gexc.NotFound:
        return None
    return op.name


@task(**task_retries())
def wait_operation(*, project: str, location: str, operation: str) -> dict[str, Any]:
    """Wait for a long-running operation; raises OperationFailed with GKE's own message on error."""
    from google.cloud import container_v1

    client = cluster_manager()
    name = operation if operation.startswith("projects/") else f"{_parent(project, location)}/operations/{operation}"

    progress: list[WaitProgress] = []  # made on the first poll, when the operation's type is known

    def check() -> dict[str, Any]:
        op = client.get_operation(name=name, **_call_opts())
        if not progress:
            progress.append(operation_progress(op.operation_type.name, op.target_link.rsplit("/", 1)[-1]))
        if op.status != container_v1.Operation.Status.DONE:
            progress[0].update(op.status_message or op.status.name.lower())
            raise _NotDone()
        progress[0].done()
        return _to_dict(op)

    op = _poll(check, what=f"operation {operation}")
    message = (op.get("error") or {}).get("message") or op.get("status_message") or ""
    if message:
        raise OperationFailed(op, message)
    return op


@task(**task_retries())
def wait_cluster_running(*, project: str, location: str, name: str) -> dict[str, Any]:
    """For a rerun that finds the cluster mid-provisioning: wait until RUNNING (or fail on ERROR)."""
    client = cluster_manager()

    def check() -> dict[str, Any]:
        cluster = _to_dict(client.get_cluster(name=f"{_parent(project, location)}/clusters/{name}", **_call_opts()))
        if cluster.get("status") in ("ERROR", "DEGRADED"):
            raise FleetError(f"cluster {name} is {cluster['status']}: {cluster.get('status_message', '')}",
                             "see the GKE console; delete it and rerun provision_cluster")
        if cluster.get("status") != "RUNNING":
            raise _NotDone()
        return cluster

    return _poll(check, what=f"cluster {name}")


@task(**task_retries())
def get_node_pool(*, project: str, location: str, cluster: str, name: str) -> dict[str, Any] | None:
    try:
        pool = cluster_manager().get_node_pool(
            name=f"{_parent(project, location)}/clusters/{cluster}/nodePools/{name}", **_call_opts())
    except gexc.NotFound:
        return None
    return _to_dict(pool)


@task(**task_retries())
def create_node_pool(*, project: str, location: str, cluster: str, body: dict[str, Any]) -> str | None:
    """Start creating a node pool; returns the operation name, or None when it already exists."""
    from google.cloud import container_v1

    try:
        op = cluster_manager().create_node_pool(parent=f"{_parent(project, location)}/clusters/{cluster}",
                                                node_pool=container_v1.NodePool(body), **_call_opts())
    except gexc.Conflict:
        return None
    return op.name


@task(**task_retries())
def delete_node_pool(*, project: str, location: str, cluster: str, name: str) -> str | None:
    fence()
    try:
        op = cluster_manager().delete_node_pool(
            name=f"{_parent(project, location)}/clusters/{cluster}/nodePools/{name}", **_call_opts())
    except gexc.NotFound:
        return None
    return op.name


@task(**task_retries())
def set_node_pool_autoscaling(*, project: str, location: str, cluster: str, name: str,
                              min_nodes: int, max_nodes: int) -> str:
    from google.cloud import container_v1

    fence()  # a node pool is shared by the namespace's models: any lock this process lost stops it

    request = container_v1.SetNodePoolAutoscalingRequest(
        name=f"{_parent(project, location)}/clusters/{cluster}/nodePools/{name}",
        autoscaling=container_v1.NodePoolAutoscaling(enabled=True, min_node_count=min_nodes,
                                                     max_node_count=max_nodes))
    return cluster_manager().set_node_pool_autoscaling(request=request, **_call_opts()).name


@task(**task_retries())
def enable_filestore_csi(*, project: str, location: str, name: str) -> str:
    """Turn on the Filestore CSI driver add-on (what creates the *-rwx StorageClasses); returns the operation."""
    from google.cloud import container_v1

    update = container_v1.ClusterUpdate(desired_addons_config=container_v1.AddonsConfig(
        gcp_filestore_csi_driver_config=container_v1.GcpFilestoreCsiDriverConfig(enabled=True)))
    return cluster_manager().update_cluster(name=f"{_parent(project, location)}/clusters/{name}", update=update,
                                            **_call_opts()).name


@task(**task_retries())
def set_node_pool_size(*, project: str, location: str, cluster: str, name: str, nodes: int) -> str:
    from google.cloud import container_v1

    fence()

    # This RPC has no flattened arguments: it takes only a request message.
    request = container_v1.SetNodePoolSizeRequest(
        name=f"{_parent(project, location)}/clusters/{cluster}/nodePools/{name}", node_count=nodes)
    return cluster_manager().set_node_pool_size(request=request, **_call_opts()).name


@task(**task_retries())
def get_credentials(*, project: str, location: str, name: str) -> str:
    """Write the cluster's kubeconfig as gcloud does (https endpoint, cluster CA, gke-gcloud-auth-plugin);
    returns its path. The product's own clients read endpoint + CA from it and bring their own token."""
    cluster = get_cluster.fn(project=project, location=location, name=name)
    if cluster is None:
        raise FleetError(f"cluster {name} does not exist in {project}/{location}", "run provision_cluster first")
    google_access_token()  # fail here, clearly, when credentials are missing
    path = write_kubeconfig(project=project, location=location, cluster=name, endpoint=cluster["endpoint"],
                            ca_cert_b64=cluster.get("master_auth", {}).get("cluster_ca_certificate", ""))
    return str(path)
