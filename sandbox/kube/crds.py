"""CustomResourceDefinitions: what the API server does with them and with the objects of their kinds.

* A CRD (``apiextensions.k8s.io/v1``) gets ``status.conditions`` ``NamesAccepted`` and ``Established``
  and ``status.acceptedNames`` at once; its kind is then served (discovery, CRUD, watch) — and 404s again
  once it is deleted (kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/).
  The sandbox serves only the custom kinds it knows (``sandbox.kube.resources``: ``crd=``).
* A custom object is defaulted from the served version's ``openAPIV3Schema`` (``default:``, applied
  where the parent object exists, as the API server's structural defaulting does) and then validated
  against it (types, required, enum, min/max, pattern, lengths): a failure is the API server's 422
  ``Invalid`` naming the field. CEL rules (``x-kubernetes-validations``) are not evaluated (not emulated,
  docs/sandbox-contract.md).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import jsonschema

from sandbox.kube import resources as res

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
CRDS = res.BY_KEY[("apiextensions.k8s.io", "customresourcedefinitions")]


def installed(cluster: KubeCluster) -> frozenset[str]:
    items, _ = cluster.store.list(CRDS, None)
    return frozenset(o["metadata"]["name"] for o in items if not o["metadata"].get("deletionTimestamp"))


def admit_crd(obj: Obj) -> None:
    names = (obj.get("spec") or {}).get("names") or {}
    accepted = {k: v for k, v in names.items() if k in ("kind", "listKind", "plural", "singular", "shortNames",
                                                         "categories")}
    now = obj.get("metadata", {}).get("creationTimestamp") or "2026-01-01T00:00:00Z"
    obj["status"] = {"acceptedNames": accepted, "storedVersions": [
        v["name"] for v in (obj.get("spec") or {}).get("versions") or [] if v.get("storage")],
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted", "lastTransitionTime": now}]}


def schema_of(cluster: KubeCluster, t: res.RType) -> Obj | None:
    crd = cluster.store.get(CRDS, "", t.crd)
    for v in ((crd or {}).get("spec") or {}).get("versions") or []:
        if v.get("name") == t.version:
            return ((v.get("schema") or {}).get("openAPIV3Schema")) or None
    return None


def apply_defaults(schema: Obj, value: Any) -> Any:
    """Structural defaulting: missing properties with a ``default`` are set, recursively."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


def _k8s_schema(schema: Any) -> Any:
    """OpenAPI v3 -> JSON Schema: ``nullable`` allows null; metadata is the API server's, not the CRD's."""
    if isinstance(schema, list):
        return [_k8s_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _k8s_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def validate_object(schema: Obj, obj: Obj) -> list[tuple[str, str]]:
    """(field path, message) for each way ``obj`` breaks ``schema`` (empty: valid)."""
    body = {k: v for k, v in obj.items() if k not in ("metadata", "apiVersion", "kind")}
    js = _k8s_schema({k: v for k, v in schema.items() if k != "properties"} | {
        "properties": {k: v for k, v in (schema.get("properties") or {}).items()
                       if k not in ("metadata", "apiVersion", "kind")}})
    out = []
    for err in jsonschema.Draft4Validator(js).iter_errors(body):
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err.absolute_path)
        out.append((path.replace(".[", "["), err.message))
    return sorted(out)


def admit_custom(cluster: KubeCluster, t: res.RType, obj: Obj) -> list[tuple[str, str]]:
    schema = schema_of(cluster, t)
    if schema is None:
        return []
    apply_defaults(schema, obj)
    return validate_object(schema, obj)
