"""Spec (+ color) -> Kubernetes objects as plain dicts. Pure: no I/O, no clients, no Prefect."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from manifests import gateway, names, playground, startup
from manifests.catalog import pod_resources
from manifests.names import Color
from manifests.spec import DeploymentSpec, SpecError

Obj = dict[str, Any]
GPU = "nvidia.com/gpu"
HEALTH_PATH = "/health"  # every engine's (vLLM, SGLang, TGI): the probes' and the load balancer's health check


def _meta(spec: DeploymentSpec, name: str, *, labels: dict[str, str] | None = None,
          annotations: dict[str, str] | None = None, namespaced: bool = True) -> Obj:
    meta: Obj = {"name": name, "labels": {**names.common_labels(spec), **(labels or {})}}
    if namespaced:
        meta["namespace"] = spec.namespace
    if annotations:
        meta["annotations"] = annotations
    return meta


# Pod Security Admission for the model's namespace (GKE hardening guide): refuse what baseline forbids
# (privileged, host namespaces/paths/ports, added capabilities) even from a Deployment the operator may
# create; warn on restricted (the TGI/SGLang images run as root, so restricted cannot be enforced).
POD_SECURITY = {"pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/warn": "restricted"}


def namespace(spec: DeploymentSpec) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": spec.namespace, "labels": {"app.kubernetes.io/part-of": "llm-fleet", **POD_SECURITY}}}


def cache_claim(spec: DeploymentSpec) -> Obj:
    pvc_spec: Obj = {"accessModes": [spec.cache.access_mode], "resources": {"requests": {"storage": spec.cache.size}}}
    if spec.cache.storage_class:
        pvc_spec["storageClassName"] = spec.cache.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(spec, names.cache_claim(spec)), "spec": pvc_spec}


def workload_account(spec: DeploymentSpec) -> Obj | None:
    if not spec.service_account:
        return None
    ann = {"iam.gke.io/gcp-service-account": spec.gcp_service_account} if spec.gcp_service_account else None
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(spec, spec.service_account, annotations=ann)}


# What a cluster admin applies and the operator may only read (its RBAC, its namespace with the Pod
# Security labels): a flow re-applies one only when it differs, so the operator needs no write verb on
# them. The instance label aside: one Role serves every model of the namespace, whichever applied it.
ADMIN_KINDS = {"Namespace", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def admin_object_current(desired: Obj, live: Obj | None) -> bool:
    """True when ``live`` already grants/labels what ``desired`` does (nothing to apply)."""
    if live is None or desired.get("kind") not in ADMIN_KINDS:
        return False
    if desired["kind"] == "Namespace":
        have = live.get("metadata", {}).get("labels") or {}
        return all(have.get(k) == v for k, v in (desired["metadata"].get("labels") or {}).items())
    return all(desired.get(k) == live.get(k) for k in ("rules", "roleRef", "subjects"))


def operator_rbac(spec: DeploymentSpec) -> list[Obj]:
    """What a Prefect worker running as the operator ServiceAccount needs to run every flow (deploy,
    release, park/wake, teardown) in this namespace, and no more; a cluster admin applies it once.

    Cluster-scoped reads (the preflight's StorageClass / IngressClass / custom-metrics APIService,
    park's GPU nodes) need a ClusterRole; everything else is a Role in the namespace. Server-side apply
    of a missing object is authorized as create as well as patch.

    Least privilege that limits (Kubernetes' RBAC good practices): Secrets only by name — the HF token's
    and the hold proxy's Prefect credential (``create`` cannot be limited by name in RBAC; ``list``/``watch``
    would read every Secret); on RBAC objects and the namespace only ``get`` and teardown's ``delete`` of
    its own, by name — no ``patch`` (a RoleBinding patch binds the Role to anyone, a namespace patch
    drops the Pod Security labels), no ``create``/``bind``/``escalate``. Those are a cluster admin's,
    applied once; the flows then leave them be (``admin_object_current``).
    """
    from manifests.park import PREFECT_AUTH_SECRET

    name, ns = names.OPERATOR_ACCOUNT, spec.namespace
    manage = ["get", "list", "create", "patch", "delete"]
    read = ["get", "list", "watch"]
    rules = [
        {"apiGroups": [""], "resources": ["namespaces"], "resourceNames": [ns], "verbs": ["get", "delete"]},
        {"apiGroups": [""], "resources": ["configmaps", "services", "serviceaccounts", "persistentvolumeclaims"],
         "verbs": manage},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": sorted({spec.secret.name, PREFECT_AUTH_SECRET}),
         "verbs": ["get", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["services/proxy"], "verbs": ["get", "create"]},  # health, smoke prompts
        {"apiGroups": [""], "resources": ["pods/proxy"], "verbs": ["get"]},  # each replica's /metrics (park_idle)
        {"apiGroups": [""], "resources": ["pods", "endpoints"], "verbs": read},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        # capacity options: where the pods landed and why, from the cluster autoscaler's events
        # the autoscaler's word on where pods landed; the kubelet's on a wake's image pull (wake phases)
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": [*manage, "watch"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "networkpolicies"], "verbs": manage},
        {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": manage},
        {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": manage},  # the hold proxy's
        {"apiGroups": ["monitoring.googleapis.com"], "resources": ["podmonitorings", "rules"], "verbs": manage},
        {"apiGroups": ["cloud.google.com"], "resources": ["backendconfigs"], "verbs": manage},  # GCE Ingress timeout
        # the Inference Gateway (expose.gateway): its objects, and each canary step's checked route update
        *([{"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways", "httproutes"],
            "verbs": [*manage, "update"]},
           {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"], "verbs": [*manage, "update"]},
           {"apiGroups": ["inference.networking.x-k8s.io"], "resources": ["inferenceobjectives"],
            "verbs": [*manage, "update"]}] if spec.expose.gateway else []),
        # The model lock (tasks/locks.py): take, renew and give up the model's Lease. No resourceNames: the
        # Role is shared by every model in the namespace (each has its own Lease), and create cannot be
        # restricted by name in RBAC anyway.
        # (delete: teardown removes a torn-down model's Lease when the namespace stays for another model)
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update",
                                                                                 "delete"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"],
         "resourceNames": [name, *([playground.ACCOUNT] if spec.expose.playground else []),
                           *([gateway.epp_name(spec, c) for c in names.COLORS] if spec.expose.gateway else [])],
         "verbs": ["get", "delete"]},
    ]
    cluster_name = names.operator_cluster_rbac(ns)
    cluster_rules = [
        {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"], "verbs": ["get"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingressclasses"], "verbs": ["get"]},
        {"apiGroups": ["apiregistration.k8s.io"], "resources": ["apiservices"], "verbs": ["get"],
         "resourceNames": ["v1beta1.custom.metrics.k8s.io", "v1beta2.custom.metrics.k8s.io"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
        # park: who else runs on the GPU pool, in any namespace (read only: pods and Deployments, no Secrets)
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list"]},
        # the Gateway preflight: are the Gateway API / Inference Extension CRDs installed?
        *([{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list"]}]
          if spec.expose.gateway else []),
        # the spec's ComputeClass (capacity options): applied by deploy, deleted by teardown
        *([{"apiGroups": ["cloud.google.com"], "resources": ["computeclasses"], "verbs": ["create"]},
           {"apiGroups": ["cloud.google.com"], "resources": ["computeclasses"],
            "resourceNames": [names.compute_class(spec)], "verbs": ["get", "patch", "delete"]}]
          if has_compute_class(spec) else []),
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles", "clusterrolebindings"],
         "resourceNames": [cluster_name], "verbs": ["get", "delete"]},
    ]
    labels = {"app.kubernetes.io/component": "operator"}
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
    rbac = "rbac.authorization.k8s.io"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(spec, name, labels=labels)},
        {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": _meta(spec, name, labels=labels), "rules": rules},
        {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": _meta(spec, name, labels=labels),
         "roleRef": {"apiGroup": rbac, "kind": "Role", "name": name}, "subjects": subject},
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRole",
         "metadata": _meta(spec, cluster_name, labels=labels, namespaced=False), "rules": cluster_rules},
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta(spec, cluster_name, labels=labels, namespaced=False),
         "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": cluster_name}, "subjects": subject},
        *(playground.rbac(spec) if spec.expose.playground else []),
        *([o for c in names.COLORS for o in gateway.picker_rbac(spec, c)] if spec.expose.gateway else []),
    ]


# A deleted serving pod (HPA scale-down, eviction, preemption) leaves the Endpoints at once, but every node's
# kube-proxy keeps sending it new connections until it has reprogrammed (1 s min sync period, seconds under
# load); the engine stops listening at SIGTERM, so those connections would be refused — among them the clients
# its own shutdown just closed, reconnecting at once. The engine keeps serving this long first.
PRE_STOP_S = 5  # > kube-proxy's programming delay; well inside the 60 s grace and a preemption's 15 s


def _engine_container(spec: DeploymentSpec, revision: str) -> Obj:
    eng, model = spec.engine, spec.model
    port = eng.container_port
    token = {"name": spec.secret.env,
             "valueFrom": {"secretKeyRef": {"name": spec.secret.name, "key": spec.secret.key}}}
    env: list[Obj] = [token, {"name": "HF_HOME", "value": spec.cache.mount_path}]
    args: list[str] = []
    command = eng.command
    if eng.kind == "vllm":
        args = [f"--model={model.id}", f"--revision={revision}", f"--port={port}",
                f"--tensor-parallel-size={eng.tensor_parallel}", f"--dtype={eng.dtype}"]
        if eng.quantization:
            args.append(f"--quantization={eng.quantization}")
        if eng.max_model_len:
            args.append(f"--max-model-len={eng.max_model_len}")
        if eng.gpu_memory_utilization:
            args.append(f"--gpu-memory-utilization={eng.gpu_memory_utilization}")
        if eng.max_concurrent_requests:
            args.append(f"--max-num-seqs={eng.max_concurrent_requests}")
        if eng.trust_remote_code:
            args.append("--trust-remote-code")
    elif eng.kind == "tgi":
        # TGI is configured through its environment, the way seeds 000 and 003 do it.
        env += [{"name": "MODEL_ID", "value": model.id}, {"name": "REVISION", "value": revision},
                {"name": "NUM_SHARD", "value": str(eng.tensor_parallel)}, {"name": "PORT", "value": str(port)},
                {"name": "HUGGINGFACE_HUB_CACHE", "value": spec.cache.mount_path}]
        if eng.dtype != "auto" and not eng.quantization:
            env.append({"name": "DTYPE", "value": eng.dtype})
        if eng.quantization:
            env.append({"name": "QUANTIZE", "value": eng.quantization})
        if eng.max_model_len:
            env += [{"name": "MAX_INPUT_LENGTH", "value": str(eng.max_model_len - 1)},
                    {"name": "MAX_TOTAL_TOKENS", "value": str(eng.max_model_len)}]
        if eng.max_concurrent_requests:
            env.append({"name": "MAX_CONCURRENT_REQUESTS", "value": str(eng.max_concurrent_requests)})
        if eng.trust_remote_code:
            env.append({"name": "TRUST_REMOTE_CODE", "value": "true"})
    else:  # sglang
        command = command or ["python3", "-m", "sglang.launch_server"]
        args = ["--model-path", model.id, "--revision", revision, "--host", "0.0.0.0", "--port", str(port),
                "--tp", str(eng.tensor_parallel), "--dtype", eng.dtype, "--enable-metrics"]
        if eng.quantization:
            args += ["--quantization", eng.quantization]
        if eng.max_model_len:
            args += ["--context-length", str(eng.max_model_len)]
        if eng.trust_remote_code:
            args.append("--trust-remote-code")
    args += list(eng.extra_args)
    env += _non_root_env(spec)
    env += [{"name": k, "value": v} for k, v in sorted(eng.env.items())]

    gpus = str(spec.accelerator.count)
    cpu, memory = _pod_resources(spec)
    load_s = spec.default_load_timeout().total_seconds()
    period = 10
    container: Obj = {
        "name": eng.kind,
        "image": eng.image_ref,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        # requests == limits (with the GPUs): Guaranteed QoS, sized from the node's machine type
        "resources": {"requests": {GPU: gpus, "cpu": cpu, "memory": memory},
                      "limits": {GPU: gpus, "cpu": cpu, "memory": memory}},
        # A startup probe absorbs the slow weight load; liveness only begins once it passes,
        # so a hung server is still restarted without a 10-minute initialDelaySeconds.
        "startupProbe": {"httpGet": {"path": HEALTH_PATH, "port": "http"}, "periodSeconds": period,
                         "failureThreshold": max(3, math.ceil(load_s / period))},
        "readinessProbe": {"httpGet": {"path": HEALTH_PATH, "port": "http"}, "periodSeconds": 5,
                           "failureThreshold": 3, "timeoutSeconds": 5},
        "livenessProbe": {"httpGet": {"path": HEALTH_PATH, "port": "http"}, "periodSeconds": 30,
                          "failureThreshold": 3, "timeoutSeconds": 10},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "cache", "mountPath": spec.cache.mount_path}],
        # an exec of sleep (every engine image has it; the kubelet's own sleep action needs 1.30+)
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_S)]}}},
    }
    container["securityContext"] = _container_security(spec)
    if _runs_as_non_root(spec):
        container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
    if command:
        container["command"] = list(command)
    if args:
        container["args"] = args
    if not spec.startup.is_default:  # fast-start paths: mirrored image, weights' source, eager mode
        startup.adjust_container(spec, container, revision)
    return container


# Pod hardening. Every engine: no privilege escalation, every capability dropped, the runtime's default
# seccomp profile. vLLM's image works as any user once HOME and its caches (~/.cache/vllm, ~/.config/vllm,
# ~/.triton, torch's /tmp/torchinductor_$USER) point at writable volumes, so it runs as uid 1000 on a
# read-only root filesystem. The TGI and SGLang images run as root and write into /root and their
# install trees at start (the launcher's shard sockets and kernel caches, SGLang's JIT kernels), so
# they keep root and a writable root filesystem — still without capabilities.
NON_ROOT_UID = 1000


def _runs_as_non_root(spec: DeploymentSpec) -> bool:
    # NFS (Filestore, ReadWriteMany) ignores fsGroup: a non-root engine could not write the shared cache.
    return spec.engine.kind == "vllm" and not (spec.cache.enabled and spec.cache.access_mode == "ReadWriteMany")


def _non_root_env(spec: DeploymentSpec) -> list[Obj]:
    if not _runs_as_non_root(spec):
        return []
    # USER: the uid has no passwd entry in the image, and torch's cache dir is named by getpass.getuser().
    return [{"name": "HOME", "value": "/tmp"}, {"name": "USER", "value": "vllm"}]


def _container_security(spec: DeploymentSpec) -> Obj:
    sc: Obj = {"allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]}}
    if _runs_as_non_root(spec):
        sc.update({"runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID,
                   "readOnlyRootFilesystem": True})
    return sc


def _pod_security(spec: DeploymentSpec) -> Obj:
    sc: Obj = {"seccompProfile": {"type": "RuntimeDefault"}}
    if _runs_as_non_root(spec):
        # the cache volume becomes group-writable; OnRootMismatch skips re-chowning a big cache on every start
        sc.update({"fsGroup": NON_ROOT_UID, "fsGroupChangePolicy": "OnRootMismatch"})
    return sc


def compute_class(spec: DeploymentSpec) -> Obj | None:
    """The spec's capacity options as a GKE custom ComputeClass: GKE's autoscaler tries the priorities in
    order at every scale-up (a stockout, a quota wall or a lost spot VM moves on to the next one), moves
    pods back to a better priority when it frees up (``activeMigration``), and never creates a node
    outside the list (``whenUnsatisfiable: DoNotScaleUp``). Without auto-creation the priorities match
    the pools provision_cluster creates per option (``manifests.provision.option_pool_bodies``)."""
    if not has_compute_class(spec):
        return None
    autopilot = startup.fast_nodes(spec) and spec.cluster.mode == "standard"
    priorities: list[Obj] = []
    for i, opt in enumerate(spec.capacity_options):
        rule: Obj = {"machineType": opt.machine,
                     "gpu": {"type": opt.gpu, "count": opt.count, "driverVersion": "latest"}}
        if autopilot:
            # Autopilot sizes the G2 node to the pod; the boot disk is what fast-starting nodes need
            # (pd-balanced, at most 500 GiB: checked by startup.check)
            rule = {"gpu": rule["gpu"], "storage": {"bootDiskType": "pd-balanced",
                                                    "bootDiskSize": spec.accelerator.pool.disk_size_gb}}
        if opt.provisioning == "spot":
            rule["spot"] = True
        elif opt.provisioning == "flex-start":
            rule["flexStart"] = {"enabled": True}
        elif opt.provisioning == "reservation":
            rule["reservations"] = {"affinity": "Specific",
                                    "specific": [{"name": opt.reservation, "project": spec.cluster.project}]}
        zones = spec.option_zones(i)
        if zones:
            rule["location"] = {"zones": zones}
        priorities.append(rule)
    auto = spec.cluster.mode == "autopilot" or spec.cluster.node_pool_auto_creation or autopilot
    body: Obj = {"priorities": priorities,
                 "activeMigration": {"optimizeRulePriority": migrates_back(spec)},
                 "nodePoolAutoCreation": {"enabled": auto},
                 "whenUnsatisfiable": "DoNotScaleUp"}
    if autopilot:  # GKE runs the pods that select it in Autopilot mode: fast-starting nodes
        body["autopilot"] = {"enabled": True}
    return {"apiVersion": "cloud.google.com/v1", "kind": "ComputeClass",
            "metadata": _meta(spec, names.compute_class(spec), namespaced=False), "spec": body}


def has_compute_class(spec: DeploymentSpec) -> bool:
    """Capacity options, or fast-starting nodes on a Standard cluster (an Autopilot-mode ComputeClass; an
    Autopilot cluster runs every pod in Autopilot mode already)."""
    return bool(spec.capacity) or (startup.fast_nodes(spec) and spec.cluster.mode == "standard")


def migrates_back(spec: DeploymentSpec) -> bool:
    """GKE's active migration drains a fallback node once a better option frees up. It moves replicas one
    at a time under the model's PodDisruptionBudget, so only a model that always keeps a second replica
    serving migrates with no dropped request; a single replica would restart (down for a model load), so
    it stays on its fallback until its next park/wake, which starts on the best option again."""
    least = spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas
    return least >= 2


def model_budget(spec: DeploymentSpec) -> Obj | None:
    """At most one model replica disrupted at a time (GKE's active migration, node upgrades, drains) — and,
    on spot capacity, none drained voluntarily while another is down to a preemption (GCE's preemption
    itself ignores budgets: the second replica on another node is what keeps serving)."""
    if not ((spec.capacity and migrates_back(spec)) or spec.keeps_serving_through_preemption):
        return None
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(spec, f"{spec.name}-model", labels={"app.kubernetes.io/component": "model-server"}),
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": {"app.kubernetes.io/instance": spec.name,
                                                  "app.kubernetes.io/component": "model-server"}}}}


def _pod_resources(spec: DeploymentSpec) -> tuple[str, str]:
    """cpu/memory of a model pod: sized to the smallest machine among the capacity options, so the pod
    fits every option's node (with one option: that machine, as before)."""
    shapes = [pod_resources(opt.machine) for opt in spec.capacity_options]
    cpu = min(float(c) for c, _ in shapes)
    mem = min(int(m.removesuffix("Gi")) for _, m in shapes)
    return f"{cpu:g}", f"{mem}Gi"


def _placement(spec: DeploymentSpec) -> Obj:
    tolerations = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    if startup.fast_nodes(spec) and spec.cluster.mode == "standard":
        # Autopilot mode: GKE makes the node for the class (no pool label or class taint to match)
        return {"nodeSelector": {names.COMPUTE_CLASS_LABEL: names.compute_class(spec)}, "tolerations": tolerations}
    if spec.capacity:
        # the ComputeClass picks the node (any option); its nodes carry the class's label and taint
        cls = names.compute_class(spec)
        if spec.cluster.mode == "autopilot":
            return {"nodeSelector": {names.COMPUTE_CLASS_LABEL: cls}}
        tolerations.append({"key": names.COMPUTE_CLASS_LABEL, "operator": "Equal", "value": cls,
                            "effect": "NoSchedule"})
        if any(opt.spot for opt in spec.capacity_options):
            tolerations.append({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                                "effect": "NoSchedule"})
        return {"nodeSelector": {names.COMPUTE_CLASS_LABEL: cls}, "tolerations": tolerations}
    acc = spec.accelerator
    selector = {"cloud.google.com/gke-accelerator": acc.type}
    if acc.spot:
        selector["cloud.google.com/gke-spot"] = "true"
    if spec.cluster.mode == "autopilot":
        # Autopilot provisions a GPU node for this selector by itself (seed 000).
        return {"nodeSelector": selector}
    selector["cloud.google.com/gke-nodepool"] = acc.pool.name
    if acc.spot:
        tolerations.append({"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                            "effect": "NoSchedule"})
    return {"nodeSelector": selector, "tolerations": tolerations}


_DIFFERS = object()


def _color_invariant(a: Any, b: Any) -> Any:
    """The parts of two renders that are equal: what does not depend on the color they were rendered for."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = {k: _color_invariant(a[k], b[k]) for k in sorted(a.keys() & b.keys())}
        return {k: v for k, v in out.items() if v is not _DIFFERS}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [_color_invariant(x, y) for x, y in zip(a, b, strict=True)]
    return a if a == b else _DIFFERS


def spec_hash(spec: DeploymentSpec, revision: str) -> str:
    """A hash of the rendered pod template — what the pods run — so any change to it (engine args, probes
    from ``load_timeout``, ``service_account``, scrape annotations, ...) is a new color, never an in-place
    apply. The per-color part (the color label) is derived by rendering two colors and keeping what they
    share, not listed by hand."""
    blue, green = (_pod_template(spec, c, revision) for c in ("blue", "green"))
    data = _color_invariant(blue, green)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _pod_template(spec: DeploymentSpec, color: Color, revision: str) -> Obj:
    """The Deployment's pod template without its spec-hash annotation (the hash is computed from this)."""
    pod_annotations = {names.REVISION_ANNOTATION: revision}
    if spec.monitoring.scrape == "annotations":
        pod_annotations.update({"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                                "prometheus.io/port": str(spec.engine.container_port)})
    volumes: list[Obj] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.engine.shm_size}}]
    if spec.cache.enabled:
        volumes.append({"name": "cache", "persistentVolumeClaim": {"claimName": names.cache_claim(spec)}})
    else:
        volumes.append({"name": "cache", "emptyDir": {}})
    if _runs_as_non_root(spec):
        volumes.append({"name": "tmp", "emptyDir": {}})  # the only writable path besides the volumes
    volumes += startup.volumes(spec)
    pod_annotations.update(startup.pod_annotations(spec))
    pod_spec: Obj = {
        "containers": [_engine_container(spec, revision)],
        "volumes": volumes,
        # Model servers drain in-flight generations before exit.
        "terminationGracePeriodSeconds": 60,
        "securityContext": _pod_security(spec),
        **_placement(spec),
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    if spec.keeps_serving_through_preemption:
        # Replicas are one per node already (a pod asks for all of its node's GPUs); over zones too when it
        # can, so one zone's spot reclaim does not take every replica (ScheduleAnyway: a stockout in a zone
        # must not keep a replica Pending).
        pod_spec["topologySpreadConstraints"] = [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": names.selector(spec, color)}}]
    return {"metadata": {"labels": names.pod_labels(spec, color), "annotations": pod_annotations}, "spec": pod_spec}


def model_deployment(spec: DeploymentSpec, color: Color, *, revision: str | None = None,
                     replicas: int | None = None) -> Obj:
    revision = revision or spec.model.revision
    annotations = {names.REVISION_ANNOTATION: revision, names.SPEC_HASH_ANNOTATION: spec_hash(spec, revision)}
    template = _pod_template(spec, color, revision)
    template["metadata"]["annotations"][names.SPEC_HASH_ANNOTATION] = annotations[names.SPEC_HASH_ANNOTATION]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(spec, names.deployment(spec, color),
                          labels={"app.kubernetes.io/component": "model-server", names.COLOR_LABEL: color},
                          annotations=annotations),
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": names.selector(spec, color)},
            # A GPU node holds one replica: surge would wait for a node that autoscaling may not add.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "progressDeadlineSeconds": int(spec.default_load_timeout().total_seconds()),
            "template": template,
        },
    }


def applied_deployment(spec: DeploymentSpec, color: Color, *, revision: str | None = None) -> Obj:
    """The Deployment as server-side applied: with an HPA, without ``spec.replicas`` — the field is the
    HPA's, and an apply that sets it would reset the count the HPA chose (Kubernetes docs, "Migrating
    a Deployment to an HPA" / server-side apply field ownership)."""
    obj = model_deployment(spec, color, revision=revision)
    if spec.autoscaling is not None:
        obj["spec"].pop("replicas", None)
    return obj


def _service(spec: DeploymentSpec, name: str, color: Color, *, preview: bool) -> Obj:
    annotations: dict[str, str] = {}
    ing = spec.expose.ingress
    if not preview and ing is not None and ing.class_name == "gce":
        annotations["cloud.google.com/neg"] = '{"ingress": true}'  # container-native LB (seed 004)
        annotations["cloud.google.com/backend-config"] = json.dumps({"default": names.backend_config(spec)})
    if not preview and spec.monitoring.scrape == "annotations":
        annotations.update({"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics",
                            "prometheus.io/port": str(spec.expose.port)})
    role = "preview" if preview else "live"
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(spec, name, labels={"llm-fleet.dev/role": role}, annotations=annotations or None),
        "spec": {
            "type": "ClusterIP" if preview else spec.expose.service_type,
            "selector": names.selector(spec, color),
            "ports": [{"name": "http", "port": spec.expose.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def live_service(spec: DeploymentSpec, color: Color) -> Obj:
    return _service(spec, names.service(spec), color, preview=False)


def preview_service(spec: DeploymentSpec, color: Color) -> Obj:
    return _service(spec, names.preview_service(spec), color, preview=True)


def backend_config(spec: DeploymentSpec) -> Obj | None:
    """GCE Ingress: the load balancer's backend service timeout (default 30 s) must outlast a request held
    while the model wakes (hold.timeout, streamed keep-alives included) plus the generation after it
    (expose.ingress.read_timeout_s), or the LB cuts the held connection with a 502."""
    ing = spec.expose.ingress
    if ing is None or ing.class_name != "gce":
        return None
    timeout = int(spec.hold.timeout.total_seconds()) + ing.read_timeout_s if spec.hold.enabled else ing.read_timeout_s
    # The load balancer's health check, named here: GKE infers one from the readiness probe only of pods that
    # exist when it creates the backend (once), else it checks `GET /`, which no engine answers with 200 — a
    # race with the Deployment's first pod that every backend would lose. The port is each endpoint's own.
    return {"apiVersion": "cloud.google.com/v1", "kind": "BackendConfig",
            "metadata": _meta(spec, names.backend_config(spec)),
            "spec": {"timeoutSec": timeout, "connectionDraining": {"drainingTimeoutSec": 60},
                     "healthCheck": {"type": "HTTP", "requestPath": HEALTH_PATH}}}


def ingress(spec: DeploymentSpec) -> Obj | None:
    ing = spec.expose.ingress
    if ing is None:
        return None
    annotations: dict[str, str] = {}
    body: Obj = {}
    if ing.class_name == "gce":
        # GCE ingress still keys on the annotation, not ingressClassName.
        annotations["kubernetes.io/ingress.class"] = "gce"
        if ing.static_ip_name:
            annotations["kubernetes.io/ingress.global-static-ip-name"] = ing.static_ip_name
    else:
        body["ingressClassName"] = "nginx"
        annotations.update({
            "nginx.ingress.kubernetes.io/proxy-body-size": ing.proxy_body_size,
            "nginx.ingress.kubernetes.io/proxy-read-timeout": str(ing.read_timeout_s),
            # Token streams must reach the client as they are generated.
            "nginx.ingress.kubernetes.io/proxy-buffering": "off",
        })
        if ing.rate_limit_rps:
            annotations["nginx.ingress.kubernetes.io/limit-rps"] = str(ing.rate_limit_rps)
        if ing.auth_secret:
            annotations.update({"nginx.ingress.kubernetes.io/auth-type": "basic",
                                "nginx.ingress.kubernetes.io/auth-secret": ing.auth_secret,
                                "nginx.ingress.kubernetes.io/auth-realm": "llm-fleet"})
    if ing.cluster_issuer:
        annotations["cert-manager.io/cluster-issuer"] = ing.cluster_issuer
    backend = {"service": {"name": names.service(spec), "port": {"number": spec.expose.port}}}
    paths = [{"path": "/", "pathType": "Prefix", "backend": backend}]
    if spec.expose.playground:
        paths.insert(0, playground.ingress_path(spec))
    rule: Obj = {"http": {"paths": paths}}
    if ing.host:
        rule["host"] = ing.host
    body["rules"] = [rule]
    if ing.tls_secret:
        body["tls"] = [{"hosts": [ing.host], "secretName": ing.tls_secret}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": _meta(spec, names.ingress(spec), annotations=annotations or None), "spec": body}


# Where a model pod's legitimate traffic comes from (GKE): Google's front ends and health checkers for
# GCE Ingress / Gateway with container-native load balancing; ingress-nginx's namespace; Managed
# Prometheus's collectors (gmp-system); and kube-system, where the API server's proxy to pods enters
# (Konnectivity) — the flows' own readiness checks and smoke tests use that path.
GFE_RANGES = ("130.211.0.0/22", "35.191.0.0/16")


def _from_namespace(name: str) -> Obj:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def network_policy(spec: DeploymentSpec) -> Obj | None:
    if not spec.expose.network_policy:
        return None
    peers = [_from_namespace("kube-system"), _from_namespace("gmp-system")]
    ing = spec.expose.ingress
    if ing is not None and ing.class_name == "nginx":
        peers.append(_from_namespace("ingress-nginx"))
    elif ing is not None:
        peers += [{"ipBlock": {"cidr": cidr}} for cidr in GFE_RANGES]
    peers += [_from_namespace(ns) for ns in spec.expose.allow_from_namespaces]
    if spec.hold.enabled:  # while parked, held requests reach the model through the hold proxy (its namespace)
        from manifests.park import hold_proxy_peer

        peers.append(hold_proxy_peer(spec))
    if spec.expose.playground:  # the page's answers come from the model
        peers.append({"podSelector": {"matchLabels": {"app.kubernetes.io/instance": spec.name,
                                                      "app.kubernetes.io/component": "playground"}}})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(spec, f"{spec.name}-ingress"),
        "spec": {"podSelector": {"matchLabels": {**names.instance_labels(spec),
                                                 "app.kubernetes.io/component": "model-server"}},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": spec.engine.container_port}]}]},
    }


def adapter_metric(metric: str) -> str:
    """How the Custom Metrics Stackdriver Adapter (the one GKE documents for Managed Prometheus) names a
    GMP-collected gauge: ``prometheus.googleapis.com|tgi_queue_size|gauge``."""
    return metric if "|" in metric else f"prometheus.googleapis.com|{metric}|gauge"


def autoscaler(spec: DeploymentSpec, color: Color) -> Obj | None:
    hpa = spec.autoscaling
    if hpa is None:
        return None
    metric = hpa.metric or spec.engine.defaults.queue_metric
    metrics: list[Obj] = [{"type": "Pods", "pods": {
        "metric": {"name": adapter_metric(metric)},
        "target": {"type": "AverageValue", "averageValue": f"{hpa.target_queue:g}"}}}]
    if hpa.cpu_utilization:
        metrics.append({"type": "Resource", "resource": {
            "name": "cpu", "target": {"type": "Utilization", "averageUtilization": hpa.cpu_utilization}}})
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(spec, names.hpa(spec)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names.deployment(spec, color)},
            "minReplicas": hpa.min_replicas, "maxReplicas": hpa.max_replicas, "metrics": metrics,
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 30}]},
                "scaleDown": {"stabilizationWindowSeconds": int(hpa.scale_down_stabilization.total_seconds()),
                              "policies": [{"type": "Percent", "value": 50, "periodSeconds": 60}]},
            },
        },
    }


def monitoring(spec: DeploymentSpec) -> list[Obj]:
    """Google Managed Prometheus scraping and alert rules (CRDs: not schema-validated offline)."""
    out: list[Obj] = []
    mon = spec.monitoring
    # GMP collects only what a PodMonitoring selects, and the HPA's queue metric comes from GMP.
    if mon.scrape == "podmonitoring" or spec.autoscaling is not None:
        out.append({
            "apiVersion": "monitoring.googleapis.com/v1", "kind": "PodMonitoring",
            "metadata": _meta(spec, spec.name),
            "spec": {"selector": {"matchLabels": names.instance_labels(spec)},
                     "endpoints": [{"port": "http", "path": "/metrics",
                                    "interval": f"{int(mon.interval.total_seconds())}s"}]},
        })
    if mon.alerts is not None:
        a, eng = mon.alerts, spec.engine.kind
        queue = spec.engine.defaults.queue_metric
        latency = {"vllm": "vllm:e2e_request_latency_seconds_bucket", "tgi": "tgi_request_duration_bucket",
                   "sglang": "sglang:e2e_request_latency_seconds_bucket"}[eng]
        sel = f'namespace="{spec.namespace}"'
        rules = [
            {"alert": "LLMHighLatency", "for": "2m", "labels": {"severity": "warning"},
             "expr": f"histogram_quantile(0.95, sum by (le) (rate({latency}{{{sel}}}[5m]))) > {a.p95_latency_s:g}",
             "annotations": {"summary": f"{spec.name}: p95 latency above {a.p95_latency_s:g}s"}},
            {"alert": "LLMQueueBackingUp", "for": "5m", "labels": {"severity": "warning"},
             "expr": f"max({queue}{{{sel}}}) > {a.queue_size}",
             "annotations": {"summary": f"{spec.name}: more than {a.queue_size} requests queued"}},
        ]
        if a.min_success_rps is not None and eng == "tgi":
            rules.append({"alert": "LLMLowThroughput", "for": "10m", "labels": {"severity": "warning"},
                          "expr": f"sum(rate(tgi_request_success{{{sel}}}[5m])) < {a.min_success_rps:g}",
                          "annotations": {"summary": f"{spec.name}: throughput below {a.min_success_rps:g} req/s"}})
        group = {"name": f"{spec.name}-serving", "interval": f"{int(mon.interval.total_seconds())}s", "rules": rules}
        # GKE ships Managed Prometheus' Rules CRD; PrometheusRule needs the prometheus-operator installed.
        out.append({"apiVersion": "monitoring.googleapis.com/v1", "kind": "Rules",
                    "metadata": _meta(spec, names.alerts(spec)), "spec": {"groups": [group]}})
    return out


def render(spec: DeploymentSpec, *, color: Color = "blue", revision: str | None = None,
           rbac: bool = True) -> list[Obj]:
    """Every object a spec needs with ``color`` live, in apply order (namespace first)."""
    if spec.target != "gke":
        raise SpecError("target", f"target {spec.target} has no Kubernetes objects",
                        "render specs with target: gke; Vertex AI endpoints are not rendered")
    objs: list[Obj | None] = [namespace(spec), compute_class(spec)]
    if rbac:
        objs += operator_rbac(spec)
    objs += [workload_account(spec), cache_claim(spec) if spec.cache.enabled else None,
             applied_deployment(spec, color, revision=revision),
             live_service(spec, color), preview_service(spec, color),
             backend_config(spec), ingress(spec), network_policy(spec), autoscaler(spec, color), model_budget(spec),
             *monitoring(spec),
             *gateway.objects(spec, color),
             *playground.objects(spec)]
    return [o for o in objs if o is not None]


def object_key(obj: Obj) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]
