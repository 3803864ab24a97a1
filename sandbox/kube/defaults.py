"""API defaults and validation, per kind: what the real API server fills in and what it refuses (422)."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from sandbox.kube.resources import RType
from sandbox.kube.store import invalid

Obj = dict[str, Any]

GPU = "nvidia.com/gpu"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_NAMES = {"namespaces", "services"}  # names that must be DNS-1123 labels (<= 63, no dots)


# ---- validation ---------------------------------------------------------------------------------
def _check_name(t: RType, name: str, causes: list[tuple[str, str, str]]) -> None:
    if t.plural in LABEL_NAMES:
        if len(name) > 63 or not DNS1123_LABEL.match(name):
            causes.append(("metadata.name", "FieldValueInvalid",
                           f'Invalid value: "{name}": a lowercase RFC 1123 label must consist of lower case '
                           "alphanumeric characters or '-', and must start and end with an alphanumeric character "
                           "(e.g. 'my-name',  or '123-abc', regex used for validation is "
                           "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"))
    elif t.plural in ("events", "clusterroles", "clusterrolebindings", "roles", "rolebindings"):
        if "/" in name or name in (".", ".."):
            causes.append(("metadata.name", "FieldValueInvalid", f'Invalid value: "{name}": may not contain \'/\''))
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        causes.append(("metadata.name", "FieldValueInvalid",
                       f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                       "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                       "character (e.g. 'example.com', regex used for validation is "
                       "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"))


def _check_labels(labels: Any, path: str, causes: list[tuple[str, str, str]]) -> None:
    if labels is None:
        return
    if not isinstance(labels, dict):
        causes.append((path, "FieldValueInvalid", "Invalid value: must be a map of strings"))
        return
    for k, v in labels.items():
        name = k.rsplit("/", 1)[-1]
        if not name or len(name) > 63 or not QUALIFIED_NAME.match(name):
            causes.append((path, "FieldValueInvalid", f'Invalid value: "{k}": name part must consist of '
                           "alphanumeric characters, '-', '_' or '.', and must start and end with an "
                           "alphanumeric character"))
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            causes.append((f"{path}", "FieldValueInvalid", f'Invalid value: "{v}": a valid label must be an empty '
                           "string or consist of alphanumeric characters, '-', '_' or '.', and must start and "
                           "end with an alphanumeric character"))


def _check_pod_spec(spec: Any, path: str, causes: list[tuple[str, str, str]]) -> None:
    if not isinstance(spec, dict):
        causes.append((path, "FieldValueRequired", "Required value"))
        return
    containers = spec.get("containers")
    if not containers:
        causes.append((f"{path}.containers", "FieldValueRequired", "Required value"))
        return
    names = set()
    for i, c in enumerate(containers):
        cp = f"{path}.containers[{i}]"
        name = c.get("name")
        if not name:
            causes.append((f"{cp}.name", "FieldValueRequired", "Required value"))
        elif not DNS1123_LABEL.match(name) or len(name) > 63:
            causes.append((f"{cp}.name", "FieldValueInvalid", f'Invalid value: "{name}": a lowercase RFC 1123 '
                           "label must consist of lower case alphanumeric characters or '-'"))
        elif name in names:
            causes.append((f"{cp}.name", "FieldValueDuplicate", f'Duplicate value: "{name}"'))
        names.add(name)
        if not c.get("image"):
            causes.append((f"{cp}.image", "FieldValueRequired", "Required value"))
        for j, p in enumerate(c.get("ports") or []):
            port = p.get("containerPort")
            if not isinstance(port, int) or not 0 < port < 65536:
                causes.append((f"{cp}.ports[{j}].containerPort", "FieldValueInvalid",
                               f"Invalid value: {port}: must be between 1 and 65535, inclusive"))
        for res in ("requests", "limits"):
            for k, v in ((c.get("resources") or {}).get(res) or {}).items():
                if parse_quantity(v) is None:
                    causes.append((f"{cp}.resources.{res}[{k}]", "FieldValueInvalid",
                                   f'Invalid value: "{v}": quantities must match the regular expression '
                                   "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"))
        req, lim = ((c.get("resources") or {}).get("requests") or {}), ((c.get("resources") or {}).get("limits") or {})
        if GPU in req and GPU in lim and parse_quantity(req[GPU]) != parse_quantity(lim[GPU]):
            causes.append((f"{cp}.resources.requests", "FieldValueInvalid",
                           f'Invalid value: "{req[GPU]}": must be equal to {GPU} limit of {lim[GPU]}'))


def validate(t: RType, obj: Obj) -> None:
    """Raise 422 Invalid with causes, like the API server's validation."""
    causes: list[tuple[str, str, str]] = []
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    if not name:
        causes.append(("metadata.name", "FieldValueRequired", "Required value: name or generateName is required"))
    else:
        _check_name(t, name, causes)
    _check_labels(meta.get("labels"), "metadata.labels", causes)
    if meta.get("annotations") is not None and not isinstance(meta.get("annotations"), dict):
        causes.append(("metadata.annotations", "FieldValueInvalid", "Invalid value: must be a map of strings"))
    spec = obj.get("spec") or {}
    if t.kind == "Pod":
        _check_pod_spec(obj.get("spec"), "spec", causes)
    elif t.kind in ("Deployment", "ReplicaSet"):
        sel = spec.get("selector")
        if not sel or not (sel.get("matchLabels") or sel.get("matchExpressions")):
            causes.append(("spec.selector", "FieldValueRequired", "Required value"))
        tmpl = spec.get("template") or {}
        labels = (tmpl.get("metadata") or {}).get("labels") or {}
        _check_labels(labels, "spec.template.metadata.labels", causes)
        if sel and sel.get("matchLabels"):
            from sandbox.kube.selectors import match_label_selector

            if not match_label_selector(sel, labels):
                causes.append(("spec.template.metadata.labels", "FieldValueInvalid",
                               f"Invalid value: {labels!r}: `selector` does not match template `labels`"))
        _check_pod_spec(tmpl.get("spec"), "spec.template.spec", causes)
        replicas = spec.get("replicas", 1)
        if not isinstance(replicas, int) or replicas < 0:
            causes.append(("spec.replicas", "FieldValueInvalid",
                           f"Invalid value: {replicas}: must be greater than or equal to 0"))
    elif t.kind == "Service":
        stype = spec.get("type", "ClusterIP")
        if stype not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
            causes.append(("spec.type", "FieldValueNotSupported", f'Unsupported value: "{stype}": supported '
                           'values: "ClusterIP", "ExternalName", "LoadBalancer", "NodePort"'))
        ports = spec.get("ports") or []
        if not ports and stype != "ExternalName" and spec.get("clusterIP") != "None":
            causes.append(("spec.ports", "FieldValueRequired", "Required value"))
        for i, p in enumerate(ports):
            port = p.get("port")
            if not isinstance(port, int) or not 0 < port < 65536:
                causes.append((f"spec.ports[{i}].port", "FieldValueInvalid",
                               f"Invalid value: {port}: must be between 1 and 65535, inclusive"))
            if len(ports) > 1 and not p.get("name"):
                causes.append((f"spec.ports[{i}].name", "FieldValueRequired", "Required value"))
        if spec.get("selector") is not None:
            _check_labels(spec.get("selector"), "spec.selector", causes)
    elif t.kind == "Secret":
        for k, v in (obj.get("data") or {}).items():
            try:
                base64.b64decode(v or "", validate=True)
            except (binascii.Error, TypeError, ValueError):
                causes.append((f"data[{k}]", "FieldValueInvalid", "Invalid value: illegal base64 data"))
    elif t.kind == "PersistentVolumeClaim":
        if not spec.get("accessModes"):
            causes.append(("spec.accessModes", "FieldValueRequired", "Required value: at least 1 access mode is "
                           "required"))
        if not ((spec.get("resources") or {}).get("requests") or {}).get("storage"):
            causes.append(("spec.resources[storage]", "FieldValueRequired", "Required value"))
    elif t.kind == "Ingress":
        for i, rule in enumerate(spec.get("rules") or []):
            for j, p in enumerate((rule.get("http") or {}).get("paths") or []):
                if not p.get("pathType"):
                    causes.append((f"spec.rules[{i}].http.paths[{j}].pathType", "FieldValueRequired",
                                   "Required value: pathType must be specified"))
    elif t.kind == "HorizontalPodAutoscaler":
        if not spec.get("scaleTargetRef"):
            causes.append(("spec.scaleTargetRef", "FieldValueRequired", "Required value"))
        if not isinstance(spec.get("maxReplicas"), int) or spec.get("maxReplicas", 0) < 1:
            causes.append(("spec.maxReplicas", "FieldValueInvalid", "Invalid value: must be greater than 0"))
    elif t.kind in ("RoleBinding", "ClusterRoleBinding") and not obj.get("roleRef"):
        causes.append(("roleRef.name", "FieldValueRequired", "Required value"))
    if causes:
        raise invalid(t, name, causes)


_QTY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 1024, "Mi": 1024 ** 2, "Gi": 1024 ** 3, "Ti": 1024 ** 4, "Pi": 1024 ** 5, "Ei": 1024 ** 6,
           "n": 1e-9, "u": 1e-6}


def parse_quantity(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    m = _QTY.match(str(value).strip())
    if not m:
        return None
    num, suffix = m.groups()
    try:
        if suffix in _SUFFIX:
            return float(num) * _SUFFIX[suffix]
        return float(num + suffix)
    except ValueError:
        return None


# ---- defaults -----------------------------------------------------------------------------------
def _probe(p: Obj | None) -> None:
    if not p:
        return
    p.setdefault("timeoutSeconds", 1)
    p.setdefault("periodSeconds", 10)
    p.setdefault("successThreshold", 1)
    p.setdefault("failureThreshold", 3)
    if "httpGet" in p:
        p["httpGet"].setdefault("scheme", "HTTP")
        p["httpGet"].setdefault("path", "/")


def _container(c: Obj) -> None:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    image = c.get("image", "")
    tag = image.rsplit("/", 1)[-1]
    c.setdefault("imagePullPolicy", "Always" if ":" not in tag or tag.endswith(":latest") else "IfNotPresent")
    res = c.setdefault("resources", {})
    limits = res.get("limits") or {}
    if limits:
        req = res.setdefault("requests", {})
        for k, v in limits.items():
            req.setdefault(k, v)
    for p in c.get("ports") or []:
        p.setdefault("protocol", "TCP")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        _probe(c.get(probe))
    for e in c.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("fieldRef")
        if ref is not None:
            ref.setdefault("apiVersion", "v1")


def pod_spec_defaults(spec: Obj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    for c in spec.get("initContainers") or []:
        _container(c)
    for c in spec.get("containers") or []:
        _container(c)
    for v in spec.get("volumes") or []:
        for kind in ("configMap", "secret"):
            if kind in v:
                v[kind].setdefault("defaultMode", 420)


def pod_defaults(pod: Obj) -> None:
    spec = pod.setdefault("spec", {})
    pod_spec_defaults(spec)
    sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spec["serviceAccountName"] = spec["serviceAccount"] = sa
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    tolerations = spec.setdefault("tolerations", [])
    keys = {t.get("key") for t in tolerations}
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if key not in keys:
            tolerations.append({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
    status = pod.setdefault("status", {})
    status.setdefault("phase", "Pending")
    status.setdefault("qosClass", qos_class(spec))


def qos_class(spec: Obj) -> str:
    reqs, lims, any_set = True, True, False
    for c in spec.get("containers") or []:
        res = c.get("resources") or {}
        r, lm = res.get("requests") or {}, res.get("limits") or {}
        if any(k in r or k in lm for k in ("cpu", "memory")):
            any_set = True
        for k in ("cpu", "memory"):
            if k not in lm or parse_quantity(lm.get(k)) != parse_quantity(r.get(k, lm.get(k))):
                lims = False
            if k not in r:
                reqs = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if lims and reqs else "Burstable"


def _template(tmpl: Obj) -> None:
    tmpl.setdefault("metadata", {})
    tmpl["metadata"].pop("creationTimestamp", None)
    pod_spec_defaults(tmpl.setdefault("spec", {}))


def apply_defaults(t: RType, obj: Obj) -> None:
    kind = t.kind
    if kind == "Pod":
        pod_defaults(obj)
    elif kind == "Deployment":
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            ru = strategy.setdefault("rollingUpdate", {})
            ru.setdefault("maxSurge", "25%")
            ru.setdefault("maxUnavailable", "25%")
        else:
            strategy.pop("rollingUpdate", None)
        _template(spec.setdefault("template", {}))
        obj.setdefault("status", {})
    elif kind == "ReplicaSet":
        spec = obj.setdefault("spec", {})
        spec.setdefault("replicas", 1)
        _template(spec.setdefault("template", {}))
        obj.setdefault("status", {"replicas": 0})
    elif kind == "Service":
        spec = obj.setdefault("spec", {})
        stype = spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if stype != "ExternalName":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        if stype in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
        if stype == "LoadBalancer":
            spec.setdefault("allocateLoadBalancerNodePorts", True)
        for p in spec.get("ports") or []:
            p.setdefault("protocol", "TCP")
            p.setdefault("targetPort", p.get("port"))
        obj.setdefault("status", {"loadBalancer": {}})
    elif kind == "Namespace":
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {}).setdefault("phase", "Active")
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    elif kind == "Secret":
        if not obj.get("type"):  # SetDefaults_Secret: an empty type is Opaque too
            obj["type"] = "Opaque"
        string_data = obj.pop("stringData", None)
        if string_data:
            data = obj.setdefault("data", {})
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
    elif kind == "PersistentVolumeClaim":
        spec = obj.setdefault("spec", {})
        spec.setdefault("volumeMode", "Filesystem")
        spec.setdefault("storageClassName", "standard-rwo")
        obj.setdefault("status", {"phase": "Pending"})
    elif kind == "HorizontalPodAutoscaler":
        spec = obj.setdefault("spec", {})
        spec.setdefault("minReplicas", 1)
        obj.setdefault("status", {"currentReplicas": 0, "desiredReplicas": 0})
    elif kind == "Ingress":
        obj.setdefault("status", {"loadBalancer": {}})
    elif kind == "PodDisruptionBudget":
        obj.setdefault("status", {"currentHealthy": 0, "desiredHealthy": 0, "disruptionsAllowed": 0,
                                  "expectedPods": 0})
    elif kind == "Event":
        obj.setdefault("count", 1)
        obj.setdefault("type", "Normal")
        obj.setdefault("source", {})
        obj.setdefault("involvedObject", {})
        obj.setdefault("reportingComponent", "")
        obj.setdefault("reportingInstance", "")
