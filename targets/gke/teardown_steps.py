"""GKE teardown (the teardown flow): remove everything a spec created, then prove nothing labelled for it is left.

1. Find the cluster and take the model's lock (never tears down mid-release or mid-wake)
2. Inventory: every object labelled ``app.kubernetes.io/instance=<spec>``, and the other specs that
   share the namespace, the Secret, the operator RBAC, the GPU pool and the cluster
3. Remove the workloads and what they expose (Deployments of both colors, Services incl. preview,
   Ingress, HPA, monitoring), the cache PVC unless ``cache.keep_on_teardown``, the Secret and the
   operator RBAC unless another spec still uses them (then they are handed to that spec's label),
   the namespace if nothing else lives there
4. With ``cluster: true``: the GPU pool and the cluster, unless another spec's workloads use them
5. Verify: list by the instance label again (and the pool and cluster when asked) — anything left fails the run
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kubernetes.client.rest import ApiException

from manifests import gateway, names, playground
from manifests.errors import FleetError
from manifests.fleet import SpecPath
from manifests.render import ADMIN_KINDS, has_compute_class
from manifests.spec import DeploymentSpec, resolve_gke_spec
from targets.gke.capacity import capacity_for
from targets.gke.provision import find_cluster, remove_cluster, remove_pool
from tasks import gke, k8s
from tasks.credfiles import remove_cluster_credentials
from tasks.inventory import OWNED_KINDS, labelled, list_kind, ref, set_labels
from tasks.locks import drop_model_lock, model_lock
from tasks.log import logger
from tasks.report import Report, artifact_key
from tasks.usage import record_usage

MANAGED = "app.kubernetes.io/managed-by=llm-fleet"
INSTANCE = "app.kubernetes.io/instance"
# Objects Kubernetes itself puts in every namespace: not a reason to keep one.
RBAC = "rbac.authorization.k8s.io/v1"
CLUSTER_RBAC = ("ClusterRoleBinding", "ClusterRole")  # the operator's, one pair per namespace
SYSTEM_OBJECTS = {("ConfigMap", "kube-root-ca.crt"), ("ServiceAccount", "default")}


class TeardownError(FleetError):
    """Something labelled for the spec is still there after teardown."""


@dataclass
class Item:
    kind: str
    name: str
    namespace: str
    action: str  # delete | keep | hand over | gone
    why: str = ""


def _selector(spec: DeploymentSpec) -> str:
    return f"{INSTANCE}={spec.name},{MANAGED}"


def _secret_refs(deployment: dict[str, Any]) -> set[str]:
    pod = deployment.get("spec", {}).get("template", {}).get("spec", {})
    out: set[str] = set()
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        for env in c.get("env") or []:
            name = ((env.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
            if name:
                out.add(name)
        for src in c.get("envFrom") or []:
            if (src.get("secretRef") or {}).get("name"):
                out.add(src["secretRef"]["name"])
    for vol in pod.get("volumes") or []:
        if (vol.get("secret") or {}).get("secretName"):
            out.add(vol["secret"]["secretName"])
    return out


def _pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment.get("spec", {}).get("template", {}).get("spec", {})


def plan_namespace(spec: DeploymentSpec, *, mine: list[dict[str, Any]], others: list[dict[str, Any]]) -> list[
        tuple[dict[str, Any], Item]]:
    """Pure: for each object labelled for ``spec``, delete / keep / hand over (to another spec using it)."""
    users: dict[str, set[str]] = {"secret": set(), "sa": set()}
    other_names = sorted({(o["metadata"].get("labels") or {}).get(INSTANCE, "") for o in others} - {""})
    for o in others:
        if o["kind"] == "Deployment":
            inst = o["metadata"]["labels"][INSTANCE]
            for s in _secret_refs(o):
                users["secret"].add(f"{s}:{inst}")
            if _pod_spec(o).get("serviceAccountName"):
                users["sa"].add(f"{_pod_spec(o)['serviceAccountName']}:{inst}")
    plan: list[tuple[dict[str, Any], Item]] = []
    for obj in mine:
        kind, name = obj["kind"], obj["metadata"]["name"]
        item = Item(kind, name, obj["metadata"].get("namespace", ""), "delete")
        heir = None
        if kind == "PersistentVolumeClaim" and spec.cache.keep_on_teardown:
            item.action, item.why = "keep", "cache.keep_on_teardown: true (the downloaded weights stay)"
        elif kind == "Secret":
            heir = next((u.split(":", 1)[1] for u in sorted(users["secret"]) if u.split(":", 1)[0] == name), None)
        elif (kind == "ServiceAccount" and name != names.OPERATOR_ACCOUNT
              or kind in ("Role", "RoleBinding") and name == playground.ACCOUNT):  # the account's own RBAC too
            heir = next((u.split(":", 1)[1] for u in sorted(users["sa"]) if u.split(":", 1)[0] == name), None)
        elif (name == names.OPERATOR_ACCOUNT and kind in ("ServiceAccount", "Role", "RoleBinding")
              or name == names.operator_cluster_rbac(spec.namespace) and kind in CLUSTER_RBAC):
            heir = other_names[0] if other_names else None
        if heir and kind in ADMIN_KINDS:  # a cluster admin's RBAC: the operator may get and delete it, not relabel it
            item.action, item.why = "keep", f"shared with {heir}: goes with the namespace's last model"
        elif heir:
            item.action, item.why = "hand over", f"still used by {heir}: relabelled to it"
        elif kind == "Pod":
            item.why = "goes with its Deployment"
        plan.append((obj, item))
    return plan


def _others(spec: DeploymentSpec, kubeconfig: str, namespace: str | None) -> list[dict[str, Any]]:
    objs = labelled(kubeconfig=kubeconfig, namespace=namespace, label_selector=MANAGED,
                    kinds=[("apps/v1", "Deployment"), ("v1", "Service")])
    return [o for o in objs if (o["metadata"].get("labels") or {}).get(INSTANCE) not in (None, spec.name)]


def _uses_pool(spec: DeploymentSpec, deployment: dict[str, Any]) -> bool:
    selector = _pod_spec(deployment).get("nodeSelector") or {}
    return (selector.get("cloud.google.com/gke-nodepool") == spec.accelerator.pool.name or
            (has_compute_class(spec) and selector.get(names.COMPUTE_CLASS_LABEL) == names.compute_class(spec)))


def _compute_class(spec: DeploymentSpec, kubeconfig: str) -> list[dict[str, Any]]:
    """The spec's ComputeClass (capacity options, fast-starting nodes) when labelled for it: read by name
    (cluster-scoped)."""
    if not has_compute_class(spec):
        return []
    obj = k8s.get_object(kubeconfig=kubeconfig, api_version="cloud.google.com/v1", kind="ComputeClass",
                         name=names.compute_class(spec))
    return [obj] if obj is not None and (obj["metadata"].get("labels") or {}).get(INSTANCE) == spec.name else []


def _namespace_empty(kubeconfig: str, namespace: str) -> list[str]:
    """What still lives in the namespace (any owner), minus what Kubernetes puts in every namespace."""
    left = []
    for api_version, kind in [("apps/v1", "Deployment"), ("v1", "Pod"), ("v1", "Service"),
                              ("v1", "PersistentVolumeClaim"), ("v1", "Secret"), ("v1", "ConfigMap"),
                              ("v1", "ServiceAccount")]:
        try:
            found = list_kind(kubeconfig=kubeconfig, api_version=api_version, kind=kind, namespace=namespace)
        except ApiException as exc:
            if exc.status != 403:
                raise
            # The operator may not list Secrets: it cannot tell the namespace is empty, so it keeps it.
            left.append(f"{kind}s it may not list (a cluster admin deletes the namespace once empty)")
            continue
        for o in found:
            name = o["metadata"]["name"]
            if (kind, name) in SYSTEM_OBJECTS or (kind == "Secret" and o.get("type", "").endswith("service-account-token")):
                continue
            if o["metadata"].get("deletionTimestamp"):
                continue
            left.append(f"{kind}/{name}")
    return left


def _operator_cluster_rbac(spec: DeploymentSpec, kubeconfig: str) -> list[dict[str, Any]]:
    """The namespace's operator ClusterRoleBinding and ClusterRole when labelled for the spec (whoever
    applied them last): read by name, as the operator may read only its own cluster-scoped objects."""
    return [o for o in _admin_rbac(spec, kubeconfig) if o["kind"] in CLUSTER_RBAC
            and (o["metadata"].get("labels") or {}).get(INSTANCE) == spec.name]


def _admin_rbac(spec: DeploymentSpec, kubeconfig: str) -> list[dict[str, Any]]:
    """The namespace's llm-fleet RBAC (operator, playground reader), read by name whichever model's label it
    carries: one set serves every model of the namespace, a cluster admin applies it, and the operator may
    only get and delete it (no list: Role rules cannot be listed by name). Bindings before the roles."""
    ns = spec.namespace
    wanted = [("RoleBinding", names.OPERATOR_ACCOUNT, ns), ("Role", names.OPERATOR_ACCOUNT, ns)]
    if spec.expose.playground:
        wanted += [("RoleBinding", playground.ACCOUNT, ns), ("Role", playground.ACCOUNT, ns)]
    if spec.expose.gateway:  # each endpoint picker's grant: the model's own, never shared
        wanted += [(kind, gateway.epp_name(spec, c), ns) for c in names.COLORS for kind in ("RoleBinding", "Role")]
    wanted += [(kind, names.operator_cluster_rbac(ns), None) for kind in CLUSTER_RBAC]
    out = []
    for kind, name, namespace in wanted:
        obj = k8s.get_object(kubeconfig=kubeconfig, api_version=RBAC, kind=kind, name=name, namespace=namespace)
        if obj is not None and (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "llm-fleet":
            obj.setdefault("apiVersion", RBAC)
            obj.setdefault("kind", kind)
            out.append(obj)
    return out


def _named_secrets(spec: DeploymentSpec, kubeconfig: str) -> list[dict[str, Any]]:
    """The Secrets the spec may own (the HF token's, the hold proxy's Prefect credential) when labelled for
    it: read by name — the operator may not list Secrets (every one in the namespace would be readable)."""
    from manifests.park import PREFECT_AUTH_SECRET

    found = [k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Secret", name=n, namespace=spec.namespace)
             for n in sorted({spec.secret.name, PREFECT_AUTH_SECRET})]
    for o in found:
        if o is not None:
            o.setdefault("apiVersion", "v1")
            o.setdefault("kind", "Secret")
    return [o for o in found if o is not None and (o["metadata"].get("labels") or {}).get(INSTANCE) == spec.name]


def remove_namespaced(spec: DeploymentSpec, *, kubeconfig: str, dry_run: bool) -> list[Item]:
    log = logger()
    # Secrets and RBAC by name (the operator may not list them); the rest by the spec's label
    kinds = [k for k in OWNED_KINDS if k[1] not in ("Secret", "Role", "RoleBinding")]
    mine = labelled(kubeconfig=kubeconfig, namespace=spec.namespace, label_selector=_selector(spec), kinds=kinds)
    mine += _named_secrets(spec, kubeconfig)
    mine += _compute_class(spec, kubeconfig)
    mine += _admin_rbac(spec, kubeconfig)  # last: bindings go before the roles they grant
    plan = plan_namespace(spec, mine=mine, others=_others(spec, kubeconfig, spec.namespace))
    items = [i for _, i in plan]
    if dry_run:
        return items
    for obj, item in plan:
        if item.action == "delete" and obj["kind"] != "Pod":
            k8s.delete_object(kubeconfig=kubeconfig, api_version=obj["apiVersion"], kind=obj["kind"],
                              name=item.name, namespace=item.namespace)
        elif item.action == "hand over":
            heir = item.why.split("used by ", 1)[1].split(":", 1)[0]
            set_labels(kubeconfig=kubeconfig, obj=obj, labels={INSTANCE: heir})
        log.info("%s %s/%s %s", item.action, item.kind, item.name, item.why)
    # The pods go with their Deployments (foreground deletion); wait until none is left (a watch that
    # relists when the server ends it, so an early end of the stream is not taken for "still there").
    k8s.wait_pods_gone(kubeconfig=kubeconfig, namespace=spec.namespace, selector={INSTANCE: spec.name},
                       timeout_s=120)
    # The endpoint pickers' pods carry only their chart's label (app=<picker>), not the spec's: waited for
    # by it, past their 130 s termination grace.
    for color in names.COLORS if spec.expose.gateway else ():
        k8s.wait_pods_gone(kubeconfig=kubeconfig, namespace=spec.namespace,
                           selector={"app": gateway.epp_name(spec, color)}, timeout_s=180)
    return items


def remove_namespace(spec: DeploymentSpec, *, kubeconfig: str, dry_run: bool) -> Item | None:
    ns = k8s.get_object(kubeconfig=kubeconfig, api_version="v1", kind="Namespace", name=spec.namespace)
    if ns is None:
        return None
    item = Item("Namespace", spec.namespace, "", "keep")
    if spec.namespace == "default" or spec.namespace.startswith("kube-"):
        item.why = "a namespace Kubernetes owns"
        return item
    if (ns["metadata"].get("labels") or {}).get("app.kubernetes.io/part-of") != "llm-fleet":
        item.why = "not created by llm-fleet"
        return item
    left = _namespace_empty(kubeconfig, spec.namespace)
    if left:
        item.why = f"still holds {', '.join(left[:5])}" + (" …" if len(left) > 5 else "")
        return item
    item.action, item.why = "delete", "nothing else lives there"
    if not dry_run:
        k8s.delete_object(kubeconfig=kubeconfig, api_version="v1", kind="Namespace", name=spec.namespace)
    return item


def remove_capacity(spec: DeploymentSpec, *, kubeconfig: str | None, location: str, dry_run: bool) -> list[Item]:
    """The GPU pool and the cluster, each unless another spec's workloads still use it."""
    c = spec.cluster
    others = [o for o in _others(spec, kubeconfig, None) if o["kind"] == "Deployment"] if kubeconfig else []
    items: list[Item] = []
    if kubeconfig:  # the last sighting of the pool's nodes, for gpu_report (the cluster may go next)
        record_usage(spec, kubeconfig=kubeconfig)
    for name in capacity_for(spec).pool_names(spec) if c.mode == "standard" else []:
        pool = gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=name)
        if pool is not None:
            users = sorted({o["metadata"]["labels"][INSTANCE] for o in others if _uses_pool(spec, o)})
            item = Item("NodePool", name, f"{location}/{c.name}",
                        "keep" if users else "delete", f"used by {', '.join(users)}" if users else "")
            items.append(item)
            if item.action == "delete" and not dry_run:
                remove_pool(spec, location=location, name=name)
    users = sorted({o["metadata"]["labels"][INSTANCE] for o in others})
    item = Item("Cluster", c.name, f"{c.project}/{location}", "keep" if users else "delete",
                f"runs {', '.join(users)}" if users else "")
    items.append(item)
    if item.action == "delete" and not dry_run:
        remove_cluster(spec, location=location)
        remove_cluster_credentials(project=c.project, location=location, cluster=c.name)
    return items


def verify(spec: DeploymentSpec, *, kubeconfig: str | None, location: str, kept: set[tuple[str, str]],
           cluster: bool) -> list[str]:
    """What is still labelled for the spec (besides what the spec said to keep); [] means clean."""
    c = spec.cluster
    left: list[str] = []
    if gke.get_cluster(project=c.project, location=location, name=c.name) is None:
        return left
    for name in capacity_for(spec).pool_names(spec) if cluster and c.mode == "standard" else []:
        if ("NodePool", name) not in kept and not any(k == "NodePool" and n == name for k, n in kept) and \
                gke.get_node_pool(project=c.project, location=location, cluster=c.name, name=name) is not None:
            left.append(f"NodePool/{name}")
    if cluster and not any(k == "Cluster" for k, _ in kept):
        left.append(f"Cluster/{c.name}")
    if kubeconfig:
        for obj in labelled(kubeconfig=kubeconfig, namespace=None, label_selector=f"{INSTANCE}={spec.name}") + \
                _operator_cluster_rbac(spec, kubeconfig) + _compute_class(spec, kubeconfig):
            if (obj["kind"], obj["metadata"]["name"]) not in kept and not obj["metadata"].get("deletionTimestamp"):
                ns = obj["metadata"].get("namespace")
                left.append(f"{ref(obj)} in {ns}" if ns else f"{ref(obj)} (cluster-scoped)")
    return left


def teardown(spec: SpecPath | str | dict[str, Any], *, cluster: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Remove everything the spec created (with cluster=true also its GPU pool and cluster), then verify."""
    spec = resolve_gke_spec(spec, flow="teardown")
    c = spec.cluster
    report = Report("teardown", f"{spec.name} ({c.project}/{c.name})" + (" + cluster" if cluster else ""),
                    spec.slack_channel)
    key = artifact_key("teardown", spec.name)
    items: list[Item] = []
    with report.run(f"{key}-run"):
        with report.step("Find the cluster") as step:
            location, found = find_cluster(spec)
            kubeconfig = gke.get_credentials(project=c.project, location=location, name=c.name) if found else None
            step.detail = f"{c.name} in {location}" if found else "no cluster: nothing to remove in it"
        with model_lock(spec, purpose="teardown", kubeconfig=kubeconfig):
            if kubeconfig:
                with report.step(("Dry run, nothing removed: " if dry_run else "") +
                                 "Remove the model's objects (both colors, Services, Ingress, HPA, monitoring)") as step:
                    items += remove_namespaced(spec, kubeconfig=kubeconfig, dry_run=dry_run)
                    ns = remove_namespace(spec, kubeconfig=kubeconfig, dry_run=dry_run)
                    items += [ns] if ns else []
                    step.detail = _summary(items, dry_run=dry_run)
            if cluster and found:
                with report.step(("Dry run, nothing removed: " if dry_run else "") +
                                 "Remove the GPU pool and the cluster (unless shared)") as step:
                    cap = remove_capacity(spec, kubeconfig=kubeconfig, location=location, dry_run=dry_run)
                    items += cap
                    step.detail = _summary(cap, dry_run=dry_run)
            rows = [asdict(i) for i in items]
            if dry_run:
                report.table_artifact(f"{key}-plan", rows, f"What teardown of {spec.name} would do")
                report.succeed(f"dry run, nothing was changed: {_summary(items, dry_run=True) or 'nothing to remove'}")
                return {"dry_run": True, "plan": rows}
            with report.step("Verify nothing labelled for the spec remains") as step:
                kept = {(i.kind, i.name) for i in items if i.action == "keep"}
                left = verify(spec, kubeconfig=kubeconfig if found and not _cluster_gone(items) else None,
                              location=location, kept=kept, cluster=cluster)
                if left:
                    raise TeardownError(f"still there after teardown: {', '.join(left)}",
                                        "rerun teardown; if it stays, look for finalizers (kubectl describe)")
                step.detail = "nothing left" + (f" (kept: {', '.join(f'{k}/{n}' for k, n in sorted(kept))})"
                                                if kept else "")
        report.table_artifact(key, rows, f"What teardown removed for {spec.name}")
        # the model is gone, so is its lock: the Lease (when the namespace stays for another model) and any
        # Prefect limit
        drop_model_lock(spec, kubeconfig=kubeconfig if found and not _cluster_gone(items) else None)
        report.succeed(_summary(items) or "nothing was left to remove")
        return {"removed": [r for r in rows if r["action"] == "delete"], "kept": [r for r in rows if r["action"] != "delete"]}


def _cluster_gone(items: list[Item]) -> bool:
    return any(i.kind == "Cluster" and i.action == "delete" for i in items)


def _summary(items: list[Item], *, dry_run: bool = False) -> str:
    """What was (or, in a dry run, would be) deleted, handed over and kept."""
    parts = []
    for action in ("delete", "hand over", "keep"):
        these = [f"{i.kind}/{i.name}" for i in items if i.action == action and i.kind != "Pod"]
        if these:
            parts.append(f"{'would ' + action if dry_run else action}: {', '.join(these)}")
    return "; ".join(parts)
