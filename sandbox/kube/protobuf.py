"""Protobuf request bodies, as kube-apiserver reads them, for the kinds the tutorials create with kubectl.

kubectl 1.32+ sends ``Content-Type: application/vnd.kubernetes.protobuf`` on its typed creates (``kubectl create
namespace|secret|serviceaccount|configmap|token|role|rolebinding|…``, ``kubectl auth can-i``). The body is the ``k8s\\x00`` magic
then a ``runtime.Unknown`` whose ``raw`` is the object's proto2 encoding (api-concepts "Kubernetes Protobuf
encoding"). This module turns such a body into the JSON object the rest of the API server handles.

Only the messages below are known — their field numbers and JSON names as k8s.io/api and k8s.io/apimachinery
declare them (core/v1, authentication/v1, authorization/v1, rbac/v1 generated.proto; meta/v1 ObjectMeta, Time;
runtime Unknown). Anything else (another kind, or a field the table lacks) is refused with 415, never half-read:
docs/sandbox-contract.md says which kinds, and why the rest is safe to refuse.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from sandbox.kube.store import status_error

MAGIC = b"k8s\x00"
NO_PROTOBUF = ("the body of the request was in an unknown format - accepted media types include: "
               "application/json, application/yaml")

# message -> field number -> (JSON name, type). Types: string, bytes (base64 in JSON), bool, int (varint),
# time (meta/v1 Time: RFC 3339, null when empty), map:string / map:bytes (map<string, V>), a message name;
# a leading [] repeats it. Go encodes a value field even when empty and JSON omits it (omitempty): an empty
# string, 0 or false is dropped, except for a pointer field (trailing ?), where presence is the value.
_OBJECT_META = {1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"),
                4: ("selfLink", "string"), 5: ("uid", "string"), 6: ("resourceVersion", "string"),
                7: ("generation", "int"), 8: ("creationTimestamp", "time"), 9: ("deletionTimestamp", "time"),
                10: ("deletionGracePeriodSeconds", "int?"), 11: ("labels", "map:string"),
                12: ("annotations", "map:string"), 13: ("ownerReferences", "[]OwnerReference"),
                14: ("finalizers", "[]string")}
MESSAGES: dict[str, dict[int, tuple[str, str]]] = {
    "ObjectMeta": _OBJECT_META,
    "OwnerReference": {5: ("apiVersion", "string"), 1: ("kind", "string"), 3: ("name", "string"),
                       4: ("uid", "string"), 6: ("controller", "bool?"),
                       7: ("blockOwnerDeletion", "bool?")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec"), 3: ("status", "NamespaceStatus")},
    "NamespaceSpec": {1: ("finalizers", "[]string")},
    "NamespaceStatus": {1: ("phase", "string")},
    "Secret": {1: ("metadata", "ObjectMeta"), 5: ("immutable", "bool?"), 2: ("data", "map:bytes"),
               4: ("stringData", "map:string"), 3: ("type", "string")},
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 4: ("immutable", "bool?"), 2: ("data", "map:string"),
                  3: ("binaryData", "map:bytes")},
    "ServiceAccount": {1: ("metadata", "ObjectMeta"), 2: ("secrets", "[]ObjectReference"),
                       3: ("imagePullSecrets", "[]LocalObjectReference"),
                       4: ("automountServiceAccountToken", "bool?")},
    "ObjectReference": {1: ("kind", "string"), 2: ("namespace", "string"), 3: ("name", "string"),
                        4: ("uid", "string"), 5: ("apiVersion", "string"), 6: ("resourceVersion", "string"),
                        7: ("fieldPath", "string")},
    "LocalObjectReference": {1: ("name", "string")},
    "TokenRequest": {1: ("metadata", "ObjectMeta"), 2: ("spec", "TokenRequestSpec"),
                     3: ("status", "TokenRequestStatus")},
    "TokenRequestSpec": {1: ("audiences", "[]string"), 4: ("expirationSeconds", "int?"),
                         3: ("boundObjectRef", "BoundObjectReference")},
    "TokenRequestStatus": {1: ("token", "string"), 2: ("expirationTimestamp", "time")},
    "BoundObjectReference": {1: ("kind", "string"), 2: ("apiVersion", "string"), 3: ("name", "string"),
                             4: ("uid", "string")},  # proto name uID, JSON uid
    "SelfSubjectAccessReview": {1: ("metadata", "ObjectMeta"), 2: ("spec", "SelfSubjectAccessReviewSpec"),
                                3: ("status", "SubjectAccessReviewStatus")},
    "SelfSubjectAccessReviewSpec": {1: ("resourceAttributes", "ResourceAttributes"),
                                    2: ("nonResourceAttributes", "NonResourceAttributes")},
    "ResourceAttributes": {1: ("namespace", "string"), 2: ("verb", "string"), 3: ("group", "string"),
                           4: ("version", "string"), 5: ("resource", "string"), 6: ("subresource", "string"),
                           7: ("name", "string")},
    "NonResourceAttributes": {1: ("path", "string"), 2: ("verb", "string")},
    "SubjectAccessReviewStatus": {1: ("allowed", "bool"), 4: ("denied", "bool"), 2: ("reason", "string"),
                                  3: ("evaluationError", "string")},
    "Role": {1: ("metadata", "ObjectMeta"), 2: ("rules", "[]PolicyRule")},
    "ClusterRole": {1: ("metadata", "ObjectMeta"), 2: ("rules", "[]PolicyRule")},  # aggregationRule (3): refused
    "PolicyRule": {1: ("verbs", "[]string"), 2: ("apiGroups", "[]string"), 3: ("resources", "[]string"),
                   4: ("resourceNames", "[]string"), 5: ("nonResourceURLs", "[]string")},
    "RoleBinding": {1: ("metadata", "ObjectMeta"), 2: ("subjects", "[]Subject"), 3: ("roleRef", "RoleRef")},
    "ClusterRoleBinding": {1: ("metadata", "ObjectMeta"), 2: ("subjects", "[]Subject"), 3: ("roleRef", "RoleRef")},
    "Subject": {1: ("kind", "string"), 2: ("apiGroup", "string"), 3: ("name", "string"), 4: ("namespace", "string")},
    "RoleRef": {1: ("apiGroup", "string"), 2: ("kind", "string"), 3: ("name", "string")},
}
KINDS = {("v1", "Namespace"), ("v1", "Secret"), ("v1", "ConfigMap"), ("v1", "ServiceAccount"),
         ("authentication.k8s.io/v1", "TokenRequest"), ("authorization.k8s.io/v1", "SelfSubjectAccessReview"),
         *(("rbac.authorization.k8s.io/v1", k) for k in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"))}
_UNKNOWN = {1: ("typeMeta", "TypeMeta"), 2: ("raw", "raw"), 3: ("contentEncoding", "string"),
            4: ("contentType", "string")}
_TYPE_META = {1: ("apiVersion", "string"), 2: ("kind", "string")}
_TIME = {1: ("seconds", "int"), 2: ("nanos", "int")}


class _Refused(Exception):
    pass


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field: varints as int, length-delimited as bytes."""
    out, at = [], 0

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            if at >= len(buf):
                raise _Refused("truncated varint")
            byte = buf[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while at < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, wire, varint()))
        elif wire == 2:
            size = varint()
            if at + size > len(buf):
                raise _Refused("truncated field")
            out.append((number, wire, buf[at:at + size]))
            at += size
        else:  # fixed32/64 and groups: no field of the messages above uses them
            raise _Refused(f"wire type {wire}")
    return out


def _message(buf: bytes, schema: dict[int, tuple[str, str]], name: str) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for number, wire, value in _fields(buf):
        if number not in schema:
            raise _Refused(f"field {number} of {name}")
        key, kind = schema[number]
        repeated, pointer = kind.startswith("[]"), kind.endswith("?")
        kind = kind.removeprefix("[]").removesuffix("?")
        if kind.startswith("map:"):
            entry = _message(value, {1: ("key", "string"), 2: ("value", kind[4:])}, f"{name}.{key}")
            obj.setdefault(key, {})[entry.get("key", "")] = entry.get("value", "")
            continue
        decoded = _value(kind, wire, value, f"{name}.{key}")
        if not (repeated or pointer) and decoded in ("", 0, False) and kind in ("string", "int", "bool", "bytes"):
            continue
        if repeated:
            obj.setdefault(key, []).append(decoded)
        else:
            obj[key] = decoded
    return obj


def _value(kind: str, wire: int, value: Any, where: str) -> Any:
    if (wire == 0) != (kind in ("int", "bool")):
        raise _Refused(f"wire type {wire} for {where}")
    if kind == "int":
        return value - (1 << 64) if value >= 1 << 63 else value  # int64 as two's complement
    if kind == "bool":
        return bool(value)
    if kind == "string":
        return value.decode()
    if kind in ("bytes", "raw"):
        return base64.b64encode(value).decode() if kind == "bytes" else value
    if kind == "time":
        t = _message(value, _TIME, where)
        if not t:
            return None
        return datetime.fromtimestamp(t.get("seconds", 0), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if kind == "TypeMeta":
        return _message(value, _TYPE_META, where)
    if kind in MESSAGES:
        return _message(value, MESSAGES[kind], kind)
    raise _Refused(f"{kind} at {where}")


def decode(body: bytes) -> dict[str, Any]:
    """The JSON object a protobuf request body carries, or 415 as for a body the sandbox cannot read."""
    if not body.startswith(MAGIC):
        raise status_error(415, "UnsupportedMediaType", NO_PROTOBUF)
    try:
        unknown = _message(body[len(MAGIC):], _UNKNOWN, "Unknown")
        meta = unknown.get("typeMeta") or {}
        kind = (meta.get("apiVersion", ""), meta.get("kind", ""))
        if kind not in KINDS or unknown.get("contentEncoding"):
            raise _Refused(f"{kind[1] or 'an object'} ({kind[0] or '?'})")
        obj = _message(unknown.get("raw") or b"", MESSAGES[kind[1]], kind[1])
    except (_Refused, UnicodeDecodeError) as exc:
        raise status_error(415, "UnsupportedMediaType", f"{NO_PROTOBUF} (the sandbox reads protobuf bodies of "
                           f"{', '.join(sorted(k for _, k in KINDS))} only; not: {exc})") from None
    return {"apiVersion": kind[0], "kind": kind[1], **obj}
