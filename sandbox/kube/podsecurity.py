"""Pod Security Admission, as the kube-apiserver's built-in ``PodSecurity`` plugin runs it (GA since 1.25, on in GKE).

A namespace's labels pick the levels: ``pod-security.kubernetes.io/enforce`` refuses a Pod that violates it
(403, ``pods "x" is forbidden: violates PodSecurity "baseline:latest": ...``; a ReplicaSet's pod creation
then fails with a ``FailedCreate`` event), ``.../warn`` answers a ``Warning`` header on Pods *and* on the
workload resources whose pod template would violate it. Checks and messages follow
k8s.io/pod-security-admission ``policy/check_*.go`` (the ones that matter for Linux pods: privileged,
host namespaces, hostPath, hostPort, capabilities, seccomp; restricted adds allowPrivilegeEscalation,
drop ALL, runAsNonRoot, runAsUser 0, seccomp RuntimeDefault). https://kubernetes.io/docs/concepts/security/pod-security-standards/
"""

from __future__ import annotations

import threading
from typing import Any

from sandbox.kube.store import status_error

Obj = dict[str, Any]
LEVELS = ("privileged", "baseline", "restricted")
LABEL = "pod-security.kubernetes.io/"
WORKLOADS = {"Deployment", "ReplicaSet", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicationController",
             "PodTemplate"}
# capabilities.add allowed at baseline (check_capabilities_baseline.go)
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}

_warnings = threading.local()  # per API request (one handler thread each): sent as Warning headers


def begin_request() -> None:
    """Collect this thread's warnings from now on (the API handler; controllers' own writes collect none)."""
    _warnings.items = []


def take_warnings() -> list[str]:
    out = getattr(_warnings, "items", None) or []
    _warnings.items = None
    return out


def _warn(message: str) -> None:
    items = getattr(_warnings, "items", None)
    if items is not None:
        items.append(message)


def _containers(pod_spec: Obj) -> list[Obj]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or []) + list(
        pod_spec.get("ephemeralContainers") or [])


def _names(cs: list[Obj]) -> str:
    quoted = ", ".join(f'"{c.get("name", "")}"' for c in cs)
    return f"container {quoted}" if len(cs) == 1 else f"containers {quoted}"


def baseline(pod_spec: Obj) -> list[str]:
    out: list[str] = []
    cs = _containers(pod_spec)
    priv = [c for c in cs if (c.get("securityContext") or {}).get("privileged") is True]
    if priv:
        out.append(f"privileged ({_names(priv)} must not set securityContext.privileged=true)")
    hosts = [f"{k}=true" for k in ("hostNetwork", "hostPID", "hostIPC") if pod_spec.get(k) is True]
    if hosts:
        out.append(f"host namespaces ({', '.join(hosts)})")
    host_paths = [v.get("name", "") for v in pod_spec.get("volumes") or [] if "hostPath" in v]
    if host_paths:
        vols = ", ".join(f'"{n}"' for n in host_paths)
        out.append(f"hostPath volumes (volume{'s' if len(host_paths) > 1 else ''} {vols})")
    ports = [(c, p["hostPort"]) for c in cs for p in c.get("ports") or [] if p.get("hostPort")]
    if ports:
        out.append("hostPort (" + ", ".join(f'container "{c.get("name")}" uses hostPort {p}' for c, p in ports) + ")")
    caps = [(c, a) for c in cs for a in ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
            if a not in BASELINE_CAPS]
    if caps:
        out.append("non-default capabilities (" + ", ".join(
            f'container "{c.get("name")}" must not include "{a}" in securityContext.capabilities.add' for c, a in caps)
            + ")")
    unconfined = ((pod_spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type") == "Unconfined"
    if unconfined or any(((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type") == "Unconfined"
                         for c in cs):
        out.append('seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")')
    return out


def restricted(pod_spec: Obj) -> list[str]:
    out = baseline(pod_spec)
    cs = _containers(pod_spec)
    psc = pod_spec.get("securityContext") or {}

    def sc(c: Obj) -> Obj:
        return c.get("securityContext") or {}

    bad = [c for c in cs if sc(c).get("allowPrivilegeEscalation") is not False]
    if bad:
        out.append(f"allowPrivilegeEscalation != false ({_names(bad)} must set "
                   "securityContext.allowPrivilegeEscalation=false)")
    bad = [c for c in cs if "ALL" not in ((sc(c).get("capabilities") or {}).get("drop") or [])]
    if bad:
        out.append(f'unrestricted capabilities ({_names(bad)} must set securityContext.capabilities.drop=["ALL"])')
    bad = [c for c in cs if sc(c).get("runAsNonRoot", psc.get("runAsNonRoot")) is not True]
    if bad:
        out.append(f"runAsNonRoot != true (pod or {_names(bad)} must set securityContext.runAsNonRoot=true)")
    if psc.get("runAsUser") == 0 or any(sc(c).get("runAsUser") == 0 for c in cs):
        out.append("runAsUser=0 (pod and containers must not set runAsUser=0)")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    bad = [c for c in cs if ((sc(c).get("seccompProfile") or {}).get("type") or pod_seccomp)
           not in ("RuntimeDefault", "Localhost")]
    if bad:
        out.append(f'seccompProfile (pod or {_names(bad)} must set securityContext.seccompProfile.type to '
                   '"RuntimeDefault" or "Localhost")')
    return out


CHECKS = {"baseline": baseline, "restricted": restricted}


def violations(level: str, pod_spec: Obj) -> list[str]:
    check = CHECKS.get(level)
    return check(pod_spec) if check else []


def _pod_spec(kind: str, obj: Obj) -> Obj | None:
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec")
    if kind == "PodTemplate":
        return (obj.get("template") or {}).get("spec")
    if kind in WORKLOADS:
        return (spec.get("template") or {}).get("spec")
    return None


def _levels(cluster: Any, namespace: str) -> dict[str, str]:
    from sandbox.kube.resources import BY_KEY

    ns = cluster.store.get(BY_KEY[("", "namespaces")], "", namespace) or {}
    labels = (ns.get("metadata") or {}).get("labels") or {}
    return {mode: labels[LABEL + mode] for mode in ("enforce", "warn") if labels.get(LABEL + mode) in LEVELS}


def admit(cluster: Any, kind: str, obj: Obj, old: Obj | None) -> None:
    """Enforce on Pod create; warn on Pods and workload templates (create and update)."""
    if kind == "Namespace":
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for mode in ("enforce", "warn", "audit"):
            value = labels.get(LABEL + mode)
            if value is not None and value not in LEVELS:
                raise status_error(422, "Invalid", f'Namespace "{obj["metadata"].get("name")}" is invalid: '
                                   f'metadata.labels[{LABEL}{mode}]: Invalid value: "{value}": must be one of '
                                   "privileged, baseline, restricted")
        return
    pod_spec = _pod_spec(kind, obj)
    if pod_spec is None:
        return
    levels = _levels(cluster, (obj.get("metadata") or {}).get("namespace", ""))
    if kind == "Pod" and old is None and (found := violations(levels.get("enforce", ""), pod_spec)):
        name = (obj.get("metadata") or {}).get("name", "")
        raise status_error(403, "Forbidden", f'pods "{name}" is forbidden: violates PodSecurity '
                           f'"{levels["enforce"]}:latest": {", ".join(found)}')
    if found := violations(levels.get("warn", ""), pod_spec):
        _warn(f'would violate PodSecurity "{levels["warn"]}:latest": {", ".join(found)}')
