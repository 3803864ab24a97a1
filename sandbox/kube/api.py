"""The Kubernetes API over HTTP: discovery, OpenAPI, CRUD + patch + watch, and the pod/service subresources."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

import yaml
from urllib3.util import wait_for_read

from manifests import yamlio
from sandbox.core import HttpError, JsonHandler, now_rfc3339, route
from sandbox.kube import autoscaling, podsecurity, portforward, protobuf
from sandbox.kube import patch as patches
from sandbox.kube import resources as res
from sandbox.kube.defaults import apply_defaults, validate
from sandbox.kube.resources import RType
from sandbox.kube.selectors import object_filter, selector_string
from sandbox.kube.store import Gone, _rng, clone, conflict, new_uid, not_found, status_error
from sandbox.kube.tables import table
from sandbox.kube.watchfaults import break_watch

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
NS = res.BY_KEY[("", "namespaces")]
PODS = res.BY_KEY[("", "pods")]
SCALE_OWNERS = {("apps", "deployments"), ("apps", "replicasets")}
MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
JSONPATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"
APPLY_CBOR = "application/apply-patch+cbor"


def _rand(n: int = 5) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(_rng.choice(alphabet) for _ in range(n))


def _patched(ctype: str, obj: Obj, body: Any) -> Obj:
    """``obj`` with a JSON patch, a merge patch or a strategic merge patch (any other type) applied."""
    if ctype == JSONPATCH:
        patched = patches.json_patch(obj, body)
    elif not isinstance(body, dict):
        raise _bad_request("patch body must be a JSON object")
    elif ctype == MERGE:
        patched = patches.merge_patch(obj, body)
    else:
        patched = patches.strategic_merge(obj, body)
    if not isinstance(patched, dict):
        raise _bad_request("patch produced an invalid object")
    return patched


def _bad_request(message: str) -> HttpError:
    return status_error(400, "BadRequest", message)


class KubeApi:
    """CRUD semantics shared by the HTTP handler and the cluster's own callers."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.store = cluster.store

    # ---- create -----------------------------------------------------------------------------
    def create(self, t: RType, namespace: str | None, body: Obj, *, manager: str = "", dry_run: bool = False,
               check_namespace: bool = True) -> Obj:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was in an unknown format")
        obj = clone(body)
        self._check_type(t, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        if t.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise _bad_request("the namespace of the provided object does not match the namespace sent on "
                                   "the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
            if check_namespace:
                self._namespace_open(meta["namespace"])
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + _rand()
        validate(t, obj)
        for k in ("uid", "resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink",
                  "managedFields"):
            meta.pop(k, None)
        meta["uid"] = new_uid()
        meta["creationTimestamp"] = now_rfc3339()
        if t.generation:
            meta["generation"] = 1
        if t.has_status and t.kind not in ("Node",):
            obj.pop("status", None)
        obj["apiVersion"], obj["kind"] = t.api_version, t.kind
        requested = clone(obj)  # the creator owns what it sent, not the defaults filled in below
        apply_defaults(t, obj)
        self.cluster.admit(t, obj, None)
        if manager:
            patches.record_update(None, requested, manager=manager, now=meta["creationTimestamp"])
            meta["managedFields"] = requested["metadata"]["managedFields"]
        if dry_run:
            if self.store.get(t, meta.get("namespace", ""), meta["name"]) is not None:
                from sandbox.kube.store import already_exists

                raise already_exists(t, meta["name"])
            return obj
        return self.store.create(t, obj)

    def _check_type(self, t: RType, obj: Obj) -> None:
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if kind and kind != t.kind:
            raise _bad_request(f"the object provided is unrecognized (must be of type {t.kind}): "
                               f"kind {kind} does not match the resource {t.plural}")
        if api_version and api_version != t.api_version:
            raise _bad_request(f"the API version in the data ({api_version}) does not match the expected API "
                               f"version ({t.api_version})")

    def _namespace_open(self, namespace: str) -> None:
        ns = self.store.get(NS, "", namespace)
        if ns is None:
            raise not_found(NS, namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise status_error(403, "Forbidden", f"{'unable to create new content in namespace'} {namespace} "
                               "because it is being terminated", name=namespace, kind="namespaces")

    # ---- update -----------------------------------------------------------------------------
    def _merge_update(self, t: RType, live: Obj, new: Obj, subresource: str) -> Obj:
        """The object to store when ``new`` replaces ``live`` through the main resource or /status."""
        if subresource == "status":
            out = clone(live)
            if "status" in new:
                out["status"] = new["status"]
            return out
        out = clone(new)
        meta = out.setdefault("metadata", {})
        live_meta = live["metadata"]
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            if k in live_meta:
                meta[k] = live_meta[k]
            else:
                meta.pop(k, None)
        meta["name"] = live_meta["name"]
        if t.namespaced:
            meta["namespace"] = live_meta["namespace"]
        if t.has_status:
            if "status" in live:
                out["status"] = live["status"]
            else:
                out.pop("status", None)
        out["apiVersion"], out["kind"] = t.api_version, t.kind
        return out

    def _finish_update(self, t: RType, live: Obj, out: Obj, *, manager: str, subresource: str,
                       expect_rv: str | None, dry_run: bool, apply_entry: bool = False) -> Obj:
        if t.kind == "Node" and subresource != "status":
            out["status"] = live.get("status", {})
        validate(t, out)
        apply_defaults(t, out)
        self._immutable(t, live, out)
        self.cluster.admit(t, out, live)
        if t.generation:
            strip = ("metadata", "status")
            if {k: v for k, v in out.items() if k not in strip} != {k: v for k, v in live.items() if k not in strip}:
                out["metadata"]["generation"] = int(live["metadata"].get("generation", 1)) + 1
        if manager and not apply_entry:
            patches.record_update(live, out, manager=manager, now=now_rfc3339(), subresource=subresource)
        if dry_run:
            return out
        return self.store.replace(t, out, expect_rv=expect_rv or live["metadata"]["resourceVersion"])

    def _immutable(self, t: RType, live: Obj, new: Obj) -> None:
        def fail(field: str, value: Any) -> None:
            from sandbox.kube.store import invalid

            raise invalid(t, live["metadata"]["name"], [(field, "FieldValueInvalid",
                                                         f"Invalid value: {json.dumps(value)}: field is immutable")])

        if t.kind in ("Deployment", "ReplicaSet"):
            if (new.get("spec") or {}).get("selector") != (live.get("spec") or {}).get("selector"):
                fail("spec.selector", (new.get("spec") or {}).get("selector"))
        elif t.kind == "Service":
            old_ip = (live.get("spec") or {}).get("clusterIP")
            new_ip = (new.get("spec") or {}).get("clusterIP")
            if new_ip and old_ip and new_ip != old_ip:
                fail("spec.clusterIPs[0]", new_ip)
        elif t.kind == "Pod":
            a = {k: v for k, v in (live.get("spec") or {}).items() if k not in ("containers", "activeDeadlineSeconds",
                                                                                "tolerations", "nodeName")}
            b = {k: v for k, v in (new.get("spec") or {}).items() if k not in ("containers", "activeDeadlineSeconds",
                                                                               "tolerations", "nodeName")}
            if a != b:
                fail("spec", "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
                             "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
                             "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds`")
        elif t.kind == "Secret" and live.get("immutable") and live.get("data") != new.get("data"):
            fail("data", "field is immutable when `immutable` is set")

    def update(self, t: RType, namespace: str, name: str, body: Obj, *, subresource: str = "",
               manager: str = "", dry_run: bool = False) -> Obj:
        if not isinstance(body, dict):
            raise _bad_request("the body of the request was in an unknown format")
        self._check_type(t, body)
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise _bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        if t.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise _bad_request("the namespace of the provided object does not match the namespace sent on the "
                               "request")
        live = self.store.get(t, namespace, name)
        if live is None:
            raise not_found(t, name)
        rv = meta.get("resourceVersion")
        if rv and rv != live["metadata"]["resourceVersion"]:
            raise conflict(t, name)
        out = self._merge_update(t, live, body, subresource)
        if subresource != "status":
            out["metadata"].setdefault("managedFields", live["metadata"].get("managedFields", []))
        return self._finish_update(t, live, out, manager=manager, subresource=subresource, expect_rv=rv or None,
                                   dry_run=dry_run)

    # ---- patch ------------------------------------------------------------------------------
    def patch(self, t: RType, namespace: str, name: str, content_type: str, raw: bytes, *, subresource: str = "",
              manager: str = "", force: bool = False, dry_run: bool = False,
              field_manager: str | None = None) -> tuple[int, Obj]:
        """``field_manager``: the explicit ?fieldManager= (apply requires one; other patches fall back to
        ``manager``, derived from the User-Agent like the real API server does)."""
        ctype = (content_type or "").split(";")[0].strip().lower()
        if ctype in (APPLY, APPLY_CBOR) or ctype == "application/apply-patch+json":
            if ctype == APPLY_CBOR:
                raise status_error(415, "UnsupportedMediaType", "the body of the request was in an unknown "
                                   f"format - accepted media types include: {APPLY}")
            try:
                body = yamlio.load_body(raw.decode() or "{}")
            except yaml.YAMLError as exc:
                raise _bad_request(f"error decoding YAML: {exc}") from None
            if not isinstance(body, dict):
                raise _bad_request("apply patch must be an object")
            return self.apply(t, namespace, name, body, subresource=subresource,
                              manager=manager if field_manager is None else field_manager, force=force,
                              dry_run=dry_run)
        if ctype not in (MERGE, STRATEGIC, JSONPATCH):
            raise status_error(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                               f"accepted media types include: {JSONPATCH}, {MERGE}, {APPLY}, {STRATEGIC}")
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise _bad_request(f"error decoding patch: {exc}") from None
        for attempt in range(8):
            live = self.store.get(t, namespace, name)
            if live is None:
                raise not_found(t, name)
            patched = _patched(ctype, live, body)
            want_rv = (patched.get("metadata") or {}).get("resourceVersion")
            if want_rv and want_rv != live["metadata"]["resourceVersion"]:
                raise conflict(t, name)
            out = self._merge_update(t, live, patched, subresource)
            try:
                return 200, self._finish_update(t, live, out, manager=manager, subresource=subresource,
                                                expect_rv=None, dry_run=dry_run)
            except HttpError as err:
                if err.status == 409 and (err.reason == "Conflict") and not want_rv and attempt < 7:
                    continue  # someone wrote in between: re-apply the patch to the new object
                raise
        raise conflict(t, name)

    def apply(self, t: RType, namespace: str, name: str, body: Obj, *, subresource: str = "", manager: str,
              force: bool, dry_run: bool = False) -> tuple[int, Obj]:
        if not manager:
            raise status_error(422, "Invalid", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required '
                               "value: is required for apply patch", kind="PatchOptions")
        self._check_type(t, body)
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise _bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        if not body.get("apiVersion") or not body.get("kind"):
            raise _bad_request("apiVersion and kind are required for apply")
        for attempt in range(8):
            live = self.store.get(t, namespace, name)
            now = now_rfc3339()
            if live is None:
                if subresource:
                    raise not_found(t, name)
                obj = patches.server_side_apply(None, body, manager=manager, force=force, now=now,
                                                qualified=t.qualified)
                obj["metadata"]["name"] = name
                entry = obj["metadata"].pop("managedFields")
                # Another writer may create it between the read and here (both checks): the apiserver's
                # GuaranteedUpdate then applies onto what exists, it never answers AlreadyExists to an apply.
                try:
                    created = self.create(t, namespace, obj, dry_run=True)
                    created["metadata"]["managedFields"] = entry
                    if dry_run:
                        return 201, created
                    return 201, self.store.create(t, created)
                except HttpError as err:
                    if err.status == 409 and err.reason == "AlreadyExists" and attempt < 7:
                        continue
                    raise
            try:
                applied = patches.server_side_apply(live, body, manager=manager, force=force, now=now,
                                                    qualified=t.qualified)
            except HttpError as err:
                if err.status == 409:
                    causes = (err.body or {}).get("causes") if isinstance(err.body, dict) else None
                    raise status_error(409, "Conflict", err.message, name=name, group=t.group, kind=t.plural,
                                       causes=causes) from None
                raise
            want_rv = meta.get("resourceVersion")
            if want_rv and want_rv != live["metadata"]["resourceVersion"]:
                raise conflict(t, name)
            out = self._merge_update(t, live, applied, subresource)
            out["metadata"]["managedFields"] = applied["metadata"]["managedFields"]
            try:
                return 200, self._finish_update(t, live, out, manager=manager, subresource=subresource,
                                                expect_rv=None, dry_run=dry_run, apply_entry=True)
            except HttpError as err:
                if err.status == 409 and err.reason == "Conflict" and attempt < 7:
                    continue
                raise
        raise conflict(t, name)

    # ---- delete -----------------------------------------------------------------------------
    def delete(self, t: RType, namespace: str, name: str, *, propagation: str = "Background",
               grace: int | None = None, dry_run: bool = False, preconditions: Obj | None = None) -> Obj:
        live = self.store.get(t, namespace, name)
        if live is None:
            raise not_found(t, name)
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != live["metadata"]["uid"]:
            raise status_error(409, "Conflict", f"Precondition failed: UID in precondition: {pre['uid']}, UID in "
                               f"object meta: {live['metadata']['uid']}", name=name, kind=t.plural, group=t.group)
        if pre.get("resourceVersion") and pre["resourceVersion"] != live["metadata"]["resourceVersion"]:
            raise conflict(t, name)
        if dry_run:
            return live
        if t.kind == "Namespace":
            return self._terminate_namespace(name)
        if t.kind == "Pod":
            return self.cluster.controller.delete_pod(namespace, name, grace=grace)
        if propagation == "Orphan":
            self._orphan(t, live)
        else:
            self.delete_dependents(live, grace=grace)
        try:
            return self.store.delete(t, namespace, name)
        except HttpError:
            return live

    def _terminate_namespace(self, name: str) -> Obj:
        def mark(ns: Obj) -> Obj | None:
            if ns["metadata"].get("deletionTimestamp"):
                return None
            ns["metadata"]["deletionTimestamp"] = now_rfc3339()
            ns["metadata"]["deletionGracePeriodSeconds"] = 0
            ns["status"] = {"phase": "Terminating"}
            return ns

        out = self.store.mutate(NS, "", name, mark)
        if out is None:
            raise not_found(NS, name)
        return out

    def _dependents(self, owner: Obj) -> list[tuple[RType, Obj]]:
        uid = owner["metadata"]["uid"]
        ns = owner["metadata"].get("namespace")
        out = []
        for t in res.TYPES:
            if not t.namespaced or ns is None:
                continue
            items, _ = self.store.list(t, ns, lambda o: any(r.get("uid") == uid for r in
                                                            o["metadata"].get("ownerReferences") or []))
            out += [(t, o) for o in items]
        return out

    def delete_dependents(self, owner: Obj, grace: int | None = None) -> None:
        for t, dep in self._dependents(owner):
            with contextlib.suppress(HttpError):
                self.delete(t, dep["metadata"].get("namespace", ""), dep["metadata"]["name"], grace=grace)

    def _orphan(self, t: RType, owner: Obj) -> None:
        uid = owner["metadata"]["uid"]
        for dt, dep in self._dependents(owner):
            def strip(o: Obj) -> Obj:
                refs = [r for r in o["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
                if refs:
                    o["metadata"]["ownerReferences"] = refs
                else:
                    o["metadata"].pop("ownerReferences", None)
                return o

            self.store.mutate(dt, dep["metadata"].get("namespace", ""), dep["metadata"]["name"], strip)

    # ---- scale ------------------------------------------------------------------------------
    def scale_of(self, t: RType, obj: Obj) -> Obj:
        meta = obj["metadata"]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": meta["name"], "namespace": meta.get("namespace"), "uid": meta["uid"],
                             "resourceVersion": meta["resourceVersion"],
                             "creationTimestamp": meta["creationTimestamp"]},
                "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
                "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                           "selector": selector_string((obj.get("spec") or {}).get("selector"))}}

    def set_scale(self, t: RType, namespace: str, name: str, new_scale: Obj, *, manager: str = "",
                  dry_run: bool = False) -> Obj:
        live = self.store.get(t, namespace, name)
        if live is None:
            raise not_found(t, name)
        rv = (new_scale.get("metadata") or {}).get("resourceVersion")
        if rv and rv != live["metadata"]["resourceVersion"]:
            raise conflict(t, name)
        replicas = (new_scale.get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            from sandbox.kube.store import invalid

            raise invalid(res.RType("autoscaling", "v1", "scale", "Scale"), name,
                          [("spec.replicas", "FieldValueInvalid",
                            f"Invalid value: {replicas}: must be greater than or equal to 0")])
        body = clone(live)
        body["spec"]["replicas"] = replicas
        out = self._finish_update(t, live, body, manager=manager, subresource="scale", expect_rv=rv,
                                  dry_run=dry_run)
        return self.scale_of(t, out)


# ---- HTTP ---------------------------------------------------------------------------------------
ROUTES: list = []


def _cluster(h: KubeHandler) -> KubeCluster:
    return h.server.state


def _installed(h: KubeHandler) -> frozenset[str]:
    """Names of the CustomResourceDefinitions in this cluster: their types are served, others 404."""
    return _cluster(h).installed_crds()


def _accept_table(h: KubeHandler) -> bool:
    return "as=Table" in (h.headers.get("Accept") or "")


def _manager(h: KubeHandler) -> str:
    fm = h.q("fieldManager")
    if fm:
        return fm
    ua = h.headers.get("User-Agent") or "unknown"
    return ua.split("/", 1)[0][:128]


def _truthy(v: str | None) -> bool:
    return (v or "").lower() in ("1", "true", "yes")


@route(ROUTES, "GET", r"/version/?")
def _version(h: KubeHandler) -> Obj:
    return _cluster(h).server_version


@route(ROUTES, "GET", r"/(healthz|livez|readyz)(/.*)?")
def _healthz(h: KubeHandler, **_: str) -> None:
    h.send_text(200, "ok")


@route(ROUTES, "GET", r"/api/?")
def _api(h: KubeHandler) -> Obj:
    return res.api_versions(f"127.0.0.1:{h.server.port}")


@route(ROUTES, "GET", r"/apis/?")
def _apis(h: KubeHandler) -> Obj:
    return res.api_groups(_installed(h))


@route(ROUTES, "GET", r"/api/v1/?")
def _core_resources(h: KubeHandler) -> Obj:
    return res.resource_list("v1")


@route(ROUTES, "GET", r"/apis/(?P<group>[^/]+)/?")
def _group(h: KubeHandler, group: str) -> Obj:
    doc = res.api_group(group, _installed(h))
    if doc is None:
        raise status_error(404, "NotFound", "the server could not find the requested resource")
    return doc


@route(ROUTES, "GET", r"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/?")
def _group_resources(h: KubeHandler, group: str, version: str) -> Obj:
    doc = res.resource_list(f"{group}/{version}", _installed(h))
    if doc is None:
        raise status_error(404, "NotFound", "the server could not find the requested resource")
    return doc


@route(ROUTES, "GET", r"/openapi/v2/?")
def _openapi_v2(h: KubeHandler) -> None:
    h.send_text(200, b"", content_type="application/octet-stream")


@route(ROUTES, "GET", r"/openapi/v3/?")
def _openapi_v3(h: KubeHandler) -> Obj:
    return res.openapi_v3_index(_installed(h))


@route(ROUTES, "GET", r"/openapi/v3/(?P<gv>api/v1|apis/[^/]+/[^/]+)")
def _openapi_v3_doc(h: KubeHandler, gv: str) -> Obj:
    doc = res.openapi_v3_doc("v1" if gv == "api/v1" else gv[len("apis/"):], _installed(h))
    if doc is None:
        raise status_error(404, "NotFound", "the server could not find the requested resource")
    return doc


def _resolve(path: str, installed: frozenset[str] | None = None
             ) -> tuple[RType, str | None, str | None, str, list[str]]:
    """URL path -> (type, namespace, name, subresource, rest of the path after the subresource)."""
    parts = path.strip("/").split("/")
    nf = status_error(404, "NotFound", "the server could not find the requested resource")
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise nf
    if rest and rest[0] == "watch":
        rest = rest[1:]
    if not rest:
        raise nf
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        t = res.find(group, version, rest[2], installed)
        if t is not None and t.namespaced:
            namespace, rest = rest[1], rest[2:]
    t = res.find(group, version, rest[0], installed)
    if t is None:
        raise nf
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else ""
    if t.namespaced and namespace is None and name is not None:
        raise nf
    if sub and sub not in t.subresources and not (t.kind == "Namespace" and sub == "finalize"):
        raise nf
    return t, namespace, name, sub, rest[3:]


def _list_body(t: RType, items: list[Obj], rv: int) -> Obj:
    return {"kind": f"{t.kind}List", "apiVersion": t.api_version, "metadata": {"resourceVersion": str(rv)},
            "items": items}


def _watch_stream(h: KubeHandler, t: RType, namespace: str | None, pred: Any) -> None:
    store = _cluster(h).store
    rv_param = h.q("resourceVersion")
    try:
        since = int(rv_param) if rv_param else None
    except ValueError:
        raise _bad_request(f"invalid resourceVersion {rv_param!r}") from None
    timeout = float(h.q("timeoutSeconds") or 1800)
    as_table = _accept_table(h)
    try:
        watcher, initial = store.watch(t, namespace, pred, since)
    except Gone as gone:
        h.start_chunked(200, "application/json")
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": str(gone),
                  "reason": "Expired", "code": 410}
        h.write_chunk(json.dumps({"type": "ERROR", "object": status}) + "\n")
        h.end_chunked()
        return
    deadline = time.monotonic() + timeout
    stop = _cluster(h).stopping
    fault = getattr(h, "fault", None)  # an injected watch_expire / watch_drop (sandbox.kube.watchfaults)
    fault_at = time.monotonic() + fault.after if fault else None

    def send(etype: str, obj: Obj) -> None:
        if as_table:
            obj = table(t.kind, [obj], obj["metadata"]["resourceVersion"],
                        include_object=h.q("includeObject") or "Metadata")
        h.write_chunk(json.dumps({"type": etype, "object": obj}) + "\n")

    try:
        h.start_chunked(200, "application/json")
        for etype, obj, _rv in initial:
            send(etype, obj)
        bookmarks = _truthy(h.q("allowWatchBookmarks"))
        last_bookmark = time.monotonic()
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if fault_at is not None and time.monotonic() >= fault_at:
                break_watch(h, fault, store)
                return
            try:
                wait = min(1.0, remaining) if fault_at is None else max(0.0, min(1.0, remaining,
                                                                                 fault_at - time.monotonic()))
                item = watcher.queue.get(timeout=wait)
            except Exception:  # queue.Empty
                if _client_gone(h):
                    return
                if bookmarks and time.monotonic() - last_bookmark > 30:
                    last_bookmark = time.monotonic()
                    h.write_chunk(json.dumps({"type": "BOOKMARK", "object": {
                        "kind": t.kind, "apiVersion": t.api_version,
                        "metadata": {"resourceVersion": str(store.resource_version)}}}) + "\n")
                continue
            if item is None:
                break
            send(item[0], item[1])
        h.end_chunked()
    except (BrokenPipeError, ConnectionResetError, OSError):
        h.close_connection = True
    finally:
        store.unwatch(watcher)


def _client_gone(h: KubeHandler) -> bool:
    try:
        readable = wait_for_read(h.connection, timeout=0)  # polls: select() fails past FD_SETSIZE
        if readable and isinstance(h.connection, ssl.SSLSocket):
            return True  # a streaming client sends nothing more: readable = TLS close_notify or EOF
        if readable:
            return h.connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
    return False


def _send_obj(h: KubeHandler, t: RType, status: int, obj: Obj) -> None:
    if _accept_table(h) and h.command == "GET":
        h.send_json(status, table(t.kind, [obj], obj["metadata"].get("resourceVersion", ""),
                                  include_object=h.q("includeObject") or "Metadata"))
    else:
        h.send_json(status, obj)


def _body(h: KubeHandler) -> Any:
    ctype = (h.headers.get("Content-Type") or "application/json").split(";")[0].strip().lower()
    raw = h.body_bytes()
    if "protobuf" in ctype:  # kubectl 1.32+'s typed creates
        return protobuf.decode(raw)
    if ctype in ("application/yaml", "text/yaml"):
        try:
            return yamlio.load(raw.decode() or "{}")
        except yaml.YAMLError as exc:
            raise _bad_request(f"error decoding YAML: {exc}") from None
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _bad_request(f"error decoding request body: {exc}") from None


def _delete_options(h: KubeHandler) -> Obj:
    opts: Obj = {}
    raw = h.body_bytes()
    if raw:
        with contextlib.suppress(ValueError):
            body = json.loads(raw)
            if isinstance(body, dict):
                opts = body
    if h.q("propagationPolicy"):
        opts["propagationPolicy"] = h.q("propagationPolicy")
    if h.q("gracePeriodSeconds") is not None:
        with contextlib.suppress(ValueError):
            opts["gracePeriodSeconds"] = int(h.q("gracePeriodSeconds") or 0)
    if h.q("dryRun"):
        opts["dryRun"] = ["All"]
    if opts.get("orphanDependents") is True:
        opts.setdefault("propagationPolicy", "Orphan")
    return opts


def _handle(h: KubeHandler, path: str) -> Any:
    cluster = _cluster(h)
    api = cluster.api
    if path.startswith("/apis/metrics.k8s.io/"):
        return autoscaling.serve_metrics_api(h, cluster, path)
    t, namespace, name, sub, rest = _resolve(path, _installed(h))
    method = h.command
    dry_run = bool(h.q("dryRun"))
    manager = _manager(h)
    if t.namespaced and namespace is None and method not in ("GET", "HEAD"):
        raise status_error(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                           "resource")
    watch = "/watch/" in path or _truthy(h.q("watch"))
    if name is None:
        if method in ("GET", "HEAD"):
            pred = object_filter(h.q("labelSelector"), h.q("fieldSelector"))
            if watch:
                _watch_stream(h, t, namespace, pred)
                return None
            items, rv = cluster.store.list(t, namespace, pred)
            if _accept_table(h):
                return table(t.kind, items, str(rv), include_object=h.q("includeObject") or "Metadata")
            return _list_body(t, items, rv)
        if method == "POST":
            created = api.create(t, namespace, _body(h), manager=manager, dry_run=dry_run)
            return 201, created
        if method == "DELETE":
            opts = _delete_options(h)
            pred = object_filter(h.q("labelSelector"), h.q("fieldSelector"))
            items, rv = cluster.store.list(t, namespace, pred)
            gone = []
            for o in items:
                with contextlib.suppress(HttpError):
                    gone.append(api.delete(t, o["metadata"].get("namespace", ""), o["metadata"]["name"],
                                           propagation=opts.get("propagationPolicy", "Background"),
                                           grace=opts.get("gracePeriodSeconds"), dry_run=dry_run))
            return _list_body(t, gone, cluster.store.resource_version)
        raise status_error(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                           "resource")
    ns = namespace or ""
    if sub == "proxy":
        cluster.proxy(h, t, ns, name, "/" + "/".join(rest))
        return None
    if sub == "log":
        cluster.controller.serve_logs(h, ns, name)
        return None
    if sub == "portforward":
        portforward.serve_portforward(h, cluster, ns, name)
        return None
    if sub in ("exec", "attach"):
        portforward.refuse_exec(sub, name)
    if sub == "scale":
        if (t.group, t.plural) not in SCALE_OWNERS:
            raise status_error(404, "NotFound", "the server could not find the requested resource")
        if method in ("GET", "HEAD"):
            live = cluster.store.get(t, ns, name)
            if live is None:
                raise not_found(t, name)
            return api.scale_of(t, live)
        if method == "PUT":
            return api.set_scale(t, ns, name, _body(h), manager=manager, dry_run=dry_run)
        if method == "PATCH":
            ctype = (h.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            raw = h.body_bytes()
            body = json.loads(raw or b"{}") if ctype != APPLY else yamlio.load_body(raw.decode() or "{}")
            pinned = isinstance(body, dict) and (body.get("metadata") or {}).get("resourceVersion")
            for attempt in range(8):
                live = cluster.store.get(t, ns, name)
                if live is None:
                    raise not_found(t, name)
                new_scale = _patched(MERGE if ctype == APPLY else ctype, api.scale_of(t, live), body)
                try:
                    return api.set_scale(t, ns, name, new_scale, manager=manager, dry_run=dry_run)
                except HttpError as err:
                    # the apiserver's GuaranteedUpdate: a patch that names no resourceVersion is re-applied
                    # to the object a concurrent writer (a controller's status update) left
                    if err.status == 409 and err.reason == "Conflict" and not pinned and attempt < 7:
                        continue
                    raise
        raise status_error(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                           "resource")
    if sub == "finalize":
        sub = "status"
    if method in ("GET", "HEAD"):
        if watch:
            pred = object_filter(None, f"metadata.name={name}")
            _watch_stream(h, t, namespace, pred)
            return None
        live = cluster.store.get(t, ns, name)
        if live is None:
            raise not_found(t, name)
        _send_obj(h, t, 200, live)
        return None
    if method == "PUT":
        return api.update(t, ns, name, _body(h), subresource=sub, manager=manager, dry_run=dry_run)
    if method == "PATCH":
        return api.patch(t, ns, name, h.headers.get("Content-Type") or "", h.body_bytes(), subresource=sub,
                         manager=manager, force=_truthy(h.q("force")), dry_run=dry_run,
                         field_manager=h.q("fieldManager") or "")
    if method == "DELETE" and not sub:
        opts = _delete_options(h)
        return api.delete(t, ns, name, propagation=opts.get("propagationPolicy", "Background"),
                          grace=opts.get("gracePeriodSeconds"), dry_run=bool(opts.get("dryRun")),
                          preconditions=opts.get("preconditions"))
    raise status_error(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")


def _safe_handle(h: KubeHandler, path: str) -> Any:
    try:
        return _handle(h, path)
    except (HttpError, BrokenPipeError, ConnectionResetError):
        raise
    except Exception as exc:  # a bug here must answer like an API server, not drop the connection
        traceback.print_exc(file=sys.stderr)
        raise status_error(500, "InternalError", f"Internal error occurred: {exc}") from None


for _method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
    route(ROUTES, _method, r"(?P<path>/apis?/.+)")(_safe_handle)


class KubeHandler(JsonHandler):
    service = "kube"
    routes = ROUTES
    server: Any

    def _dispatch(self) -> None:
        podsecurity.begin_request()
        # authentication + RBAC (sandbox.kube.auth) answer 401/403 before any route or fault sees it
        auth = getattr(self.server.state, "auth", None)
        if auth is not None and auth.intercept(self):
            return
        super()._dispatch()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def end_headers(self) -> None:
        # admission warnings (Pod Security "warn") as the API server sends them: RFC 7234 code 299
        for message in podsecurity.take_warnings():
            self.send_header("Warning", '299 - "' + message.replace('"', '\\"') + '"')
        super().end_headers()

    def error_body(self, err: HttpError) -> Any:
        if isinstance(err.body, dict) and err.body.get("kind") == "Status":
            return err.body
        reason = err.reason.replace(" ", "") if err.reason else "Unknown"
        body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": err.message, "reason": reason, "code": err.status}
        if isinstance(err.body, dict):
            body["details"] = err.body
        return body
