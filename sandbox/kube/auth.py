"""Authentication and RBAC for a sandbox Kubernetes API, the way a GKE control plane does them.

Authentication (first match wins, as the API server's union authenticator):

* ``Authorization: Bearer <Google access token>`` issued by the sandbox's Google identity
  (``sandbox.tokens.GoogleTokens``; what ``gke-gcloud-auth-plugin`` and google-auth send) -> the
  account's email, groups ``system:authenticated``. An expired or unknown token -> **401**.
* ``Authorization: Bearer <ServiceAccount JWT>`` from the TokenRequest API
  (``POST /api/v1/namespaces/N/serviceaccounts/S/token``, what ``kubectl create token`` calls), signed
  by this cluster's key; it stops working when it expires or the ServiceAccount (same uid) is gone ->
  ``system:serviceaccount:N:S``, groups ``system:serviceaccounts``, ``system:serviceaccounts:N``,
  ``system:authenticated``.
* no Authorization header -> ``system:anonymous`` / ``system:unauthenticated`` (GKE keeps anonymous
  authentication on); that user may only read ``/healthz``, ``/livez``, ``/readyz`` and ``/version``
  (``system:public-info-viewer``); anything else is **403**.

Authorization: Google accounts are allowed everything (the sandbox project's owner; GKE checks IAM
before RBAC and ``roles/owner`` holds every ``container.*`` permission). Everyone else gets RBAC:
ClusterRoleBindings and the request namespace's RoleBindings, rules matched on verbs, apiGroups,
resources (``resource/subresource``, ``*``, ``*/subresource``), resourceNames and nonResourceURLs,
plus the default roles every cluster has (``system:discovery``, ``system:basic-user``,
``system:public-info-viewer``). A denial is a 403 ``Status`` worded like the real one::

    pods is forbidden: User "system:serviceaccount:ns:sa" cannot list resource "pods" in API group ""
    in the namespace "ns"

``SelfSubjectAccessReview`` and ``SelfSubjectRulesReview`` (``kubectl auth can-i [--list]``) and
``SelfSubjectReview`` (``kubectl auth whoami``) answer from the same rules.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from manifests import yamlio
from sandbox.core import HttpError, now_rfc3339
from sandbox.kube import protobuf
from sandbox.kube import resources as res
from sandbox.kube.store import not_found, status_error

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster
    from sandbox.tokens import GoogleTokens

Obj = dict[str, Any]
SA = res.BY_KEY[("", "serviceaccounts")]
ROLES = res.BY_KEY[("rbac.authorization.k8s.io", "roles")]
ROLE_BINDINGS = res.BY_KEY[("rbac.authorization.k8s.io", "rolebindings")]
CLUSTER_ROLES = res.BY_KEY[("rbac.authorization.k8s.io", "clusterroles")]
CLUSTER_ROLE_BINDINGS = res.BY_KEY[("rbac.authorization.k8s.io", "clusterrolebindings")]
RBAC_GROUP = "rbac.authorization.k8s.io"

# Subresources whose requests are authorized as "create" whatever the HTTP method (SPDY POST or
# WebSocket GET upgrades, KEP-4006).
CONNECT_SUBRESOURCES = {"exec", "attach", "portforward"}
PUBLIC_INFO = ("/healthz", "/livez", "/readyz", "/version", "/version/")
DISCOVERY = ("/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz", "/openapi", "/openapi/*",
             "/version", "/version/")
SELF_REVIEWS = {("authorization.k8s.io", "selfsubjectaccessreviews"),
                ("authorization.k8s.io", "selfsubjectrulesreviews"),
                ("authentication.k8s.io", "selfsubjectreviews")}
READ = ["get", "list", "watch"]
WRITE = ["create", "delete", "deletecollection", "patch", "update"]
# The user-facing default ClusterRoles (simplified: the real ones aggregate per-group rules).
DEFAULT_CLUSTER_ROLES: dict[str, list[Obj]] = {
    "cluster-admin": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                      {"nonResourceURLs": ["*"], "verbs": ["*"]}],
    "admin": [{"apiGroups": ["", "apps", "autoscaling", "batch", "networking.k8s.io", "policy",
                             "rbac.authorization.k8s.io", "monitoring.googleapis.com"],
               "resources": ["*"], "verbs": READ + WRITE}],
    "edit": [{"apiGroups": ["", "apps", "autoscaling", "batch", "networking.k8s.io", "policy",
                            "monitoring.googleapis.com"],
              "resources": ["*"], "verbs": READ + WRITE}],
    "view": [{"apiGroups": ["", "apps", "autoscaling", "batch", "networking.k8s.io", "policy"],
              "resources": ["*"], "verbs": READ}],
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class User:
    name: str
    groups: list[str] = field(default_factory=list)
    uid: str = ""
    google: bool = False  # a Google identity: IAM (project owner) allows everything
    extra: dict[str, list[str]] = field(default_factory=dict)

    def info(self) -> Obj:
        out: Obj = {"username": self.name, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        if self.extra:
            out["extra"] = self.extra
        return out


ANONYMOUS = User("system:anonymous", ["system:unauthenticated"])


@dataclass
class Attributes:
    """The request attributes RBAC decides on (k8s.io/apiserver RequestInfo)."""

    verb: str
    path: str
    resource_request: bool
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""

    @property
    def combined(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


_METHOD_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "GET": "get", "HEAD": "get",
                 "DELETE": "delete", "OPTIONS": "options"}


def request_attributes(method: str, raw_path: str) -> Attributes:
    """RequestInfoFactory.NewRequestInfo: the verb and resource a request is authorized as."""
    split = urlsplit(raw_path)
    path = split.path
    query = parse_qs(split.query, keep_blank_values=True)
    verb = _METHOD_VERBS.get(method.upper(), method.lower())
    parts = [p for p in path.strip("/").split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return Attributes(verb=verb.replace("options", "get"), path=path, resource_request=False)
    watch = False
    if rest[0] == "watch":
        watch, rest = True, rest[1:]
        if not rest:
            return Attributes(verb="watch", path=path, resource_request=False)
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in ("status", "finalize"):
            rest = rest[2:]
    a = Attributes(verb=verb, path=path, resource_request=True, api_group=group, api_version=version,
                   namespace=namespace, resource=rest[0])
    if len(rest) >= 2:
        a.name = rest[1]
    if len(rest) >= 3:
        a.subresource = rest[2]
    if a.resource == "namespaces" and not a.subresource and len(rest) >= 2:
        a.namespace = a.name  # a namespace is authorized in itself
    if not a.name and verb == "get":
        a.verb = "list"
    if not a.name and verb == "delete":
        a.verb = "deletecollection"
    if watch or (a.verb in ("get", "list") and (query.get("watch") or [""])[-1].lower() in ("1", "true")):
        a.verb = "watch"
    if a.verb in ("list", "watch") and not a.name:
        for sel in (query.get("fieldSelector") or [""])[-1].split(","):
            if sel.startswith("metadata.name="):
                a.name = sel.split("=", 1)[1]
    if a.subresource in CONNECT_SUBRESOURCES:
        a.verb = "create"
    return a


def _has(values: list[str] | None, want: str) -> bool:
    return bool(values) and ("*" in values or want in values)


def rule_allows(rule: Obj, a: Attributes) -> bool:
    """One PolicyRule against one request (k8s.io/kubernetes pkg/apis/rbac/v1/evaluation_helpers.go)."""
    if not _has(rule.get("verbs"), a.verb):
        return False
    if not a.resource_request:
        for url in rule.get("nonResourceURLs") or []:
            if url == "*" or url == a.path or (url.endswith("*") and a.path.startswith(url[:-1])):
                return True
        return False
    if not _has(rule.get("apiGroups"), a.api_group):
        return False
    resources = rule.get("resources") or []
    combined = a.combined
    if not any(r == "*" or r == combined or (a.subresource and r == f"*/{a.subresource}") for r in resources):
        return False
    names = rule.get("resourceNames") or []
    return not names or a.name in names


def _subject_matches(subject: Obj, user: User, binding_ns: str) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return subject.get("name") == user.name
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return user.name == f"system:serviceaccount:{ns}:{subject.get('name')}"
    return False


def forbidden_message(user: User, a: Attributes) -> str:
    """staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go forbiddenMessage."""
    if not a.resource_request:
        return f'User "{user.name}" cannot {a.verb} path "{a.path}"'
    if a.namespace:
        return (f'User "{user.name}" cannot {a.verb} resource "{a.combined}" in API group "{a.api_group}" '
                f'in the namespace "{a.namespace}"')
    return (f'User "{user.name}" cannot {a.verb} resource "{a.combined}" in API group "{a.api_group}" '
            f"at the cluster scope")


def forbidden(user: User, a: Attributes) -> HttpError:
    """apierrors.NewForbidden(qualifiedResource, name, err)."""
    reason = forbidden_message(user, a)
    if not a.resource_request:
        return status_error(403, "Forbidden", f"forbidden: {reason}")
    qualified = f"{a.resource}.{a.api_group}" if a.api_group else a.resource
    message = f'{qualified} "{a.name}" is forbidden: {reason}' if a.name else f"{qualified} is forbidden: {reason}"
    return status_error(403, "Forbidden", message, name=a.name or None, group=a.api_group or None,
                        kind=a.resource)


class _Replay:
    """An rfile whose first bytes are a body already read (so the request can still be routed)."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        if n is None or n < 0:
            out, self._head = self._head + self._rest.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        if len(out) < n:
            out += self._rest.read(n - len(out))
        return out

    def readline(self, limit: int = -1) -> bytes:
        if self._head:  # (a body is read by length, never by line: only reached after it)
            return self.read(limit if limit > 0 else len(self._head))
        return self._rest.readline(limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rest, name)


def _peek_body(h: Any) -> Obj:
    """The request body as an object, leaving it in place for the route that will read it."""
    raw = h.body_bytes()
    h.__dict__.pop("_body", None)
    if isinstance(h.rfile, _Replay):  # (keep-alive: the wrapper of an earlier request, its head used up)
        h.rfile._head = raw
    else:
        h.rfile = _Replay(raw, h.rfile)
    text = raw.decode(errors="replace")
    try:
        body = yamlio.load_body(text)
    except (ValueError, yaml.YAMLError):
        return {}
    return body if isinstance(body, dict) else {}


def unauthorized() -> HttpError:
    return status_error(401, "Unauthorized", "Unauthorized")


class ClusterAuth:
    """The authenticator + authorizer of one ``KubeCluster``, and its TokenRequest/review endpoints."""

    def __init__(self, cluster: KubeCluster, *, google: GoogleTokens | None = None, issuer: str = "") -> None:
        from sandbox.tokens import GoogleTokens

        self.cluster = cluster
        self.google = google if google is not None else GoogleTokens(clock=cluster.clock)
        self.issuer = issuer or "https://kubernetes.default.svc.cluster.local"
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._kid = secrets.token_hex(8)
        self._verified: dict[str, Obj] = {}  # token -> claims, signature already checked
        # the audit log: (user, verb, apiGroup, resource[/subresource] or path, namespace, name, allowed)
        self.audit: deque[tuple[str, str, str, str, str, str, bool]] = deque(maxlen=20000)

    # ---- defaults every cluster has -----------------------------------------------------------
    def bootstrap(self) -> None:
        api = self.cluster.api
        boot = {"kubernetes.io/bootstrapping": "rbac-defaults"}
        for name, rules in DEFAULT_CLUSTER_ROLES.items():
            api.create(CLUSTER_ROLES, None, {"metadata": {"name": name, "labels": boot,
                                                          "annotations": {"rbac.authorization.kubernetes.io/"
                                                                          "autoupdate": "true"}},
                                             "rules": rules})
        api.create(CLUSTER_ROLE_BINDINGS, None, {
            "metadata": {"name": "cluster-admin", "labels": boot},
            "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": "system:masters"}]})

    # ---- authentication -------------------------------------------------------------------------
    def authenticate(self, header: str | None) -> User:
        if not header:
            return ANONYMOUS
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise unauthorized()
        email, expired = self.google.check(token)
        if email is not None:
            if expired:
                raise unauthorized()
            return User(email, ["system:authenticated"], google=True)
        user = self._service_account_user(token)
        if user is None:
            raise unauthorized()
        return user

    def _service_account_user(self, token: str) -> User | None:
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            if claims is None:
                return None
            if len(self._verified) > 4096:  # (a signature check costs ~1 ms: remember good ones)
                self._verified.clear()
            self._verified[token] = claims
        if time.time() >= float(claims.get("exp", 0)):
            return None
        info = claims.get("kubernetes.io") or {}
        ns, sa = info.get("namespace", ""), (info.get("serviceaccount") or {})
        live = self.cluster.store.get(SA, ns, sa.get("name", ""))
        if live is None or live["metadata"]["uid"] != sa.get("uid"):
            return None  # a bound token dies with its ServiceAccount
        return User(f"system:serviceaccount:{ns}:{sa['name']}",
                    ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
                    uid=sa["uid"])

    def _verify(self, token: str) -> Obj | None:
        """The claims of a JWT this cluster signed, or None."""
        try:
            head_b64, body_b64, sig_b64 = token.split(".")
            head = json.loads(_unb64url(head_b64))
            claims = json.loads(_unb64url(body_b64))
            sig = _unb64url(sig_b64)
        except (ValueError, json.JSONDecodeError):
            return None
        if head.get("alg") != "ES256" or len(sig) != 64 or claims.get("iss") != self.issuer:
            return None
        try:
            self._key.public_key().verify(encode_dss_signature(int.from_bytes(sig[:32]), int.from_bytes(sig[32:])),
                                          f"{head_b64}.{body_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return None
        return claims

    def issue_sa_token(self, namespace: str, name: str, *, seconds: int = 3600,
                       audiences: list[str] | None = None) -> tuple[str, float]:
        """A bound ServiceAccount token -> ``(jwt, expiry as time.time())``; ``seconds`` are cloud seconds."""
        live = self.cluster.store.get(SA, namespace, name)
        if live is None:
            raise not_found(SA, name)
        now = time.time()
        exp = now + self.cluster.clock.scaled(seconds)
        claims = {"aud": audiences or [self.issuer], "exp": int(exp) if exp - now > 5 else exp, "iat": int(now),
                  "nbf": int(now), "iss": self.issuer, "sub": f"system:serviceaccount:{namespace}:{name}",
                  "jti": secrets.token_hex(16),
                  "kubernetes.io": {"namespace": namespace,
                                    "serviceaccount": {"name": name, "uid": live["metadata"]["uid"]}}}
        head_b64 = _b64url(json.dumps({"alg": "ES256", "kid": self._kid}).encode())
        body_b64 = _b64url(json.dumps(claims).encode())
        r, s = decode_dss_signature(self._key.sign(f"{head_b64}.{body_b64}".encode(), ec.ECDSA(hashes.SHA256())))
        return f"{head_b64}.{body_b64}.{_b64url(r.to_bytes(32) + s.to_bytes(32))}", exp

    # ---- authorization --------------------------------------------------------------------------
    def _builtin_allows(self, user: User, a: Attributes) -> bool:
        """system:public-info-viewer, system:discovery, system:basic-user."""
        if not a.resource_request:
            if a.verb != "get":
                return False
            if a.path in PUBLIC_INFO or any(a.path.startswith(p + "/") for p in PUBLIC_INFO[:3]):
                return True
            if "system:authenticated" in user.groups:
                return any(a.path == d or (d.endswith("*") and a.path.startswith(d[:-1])) for d in DISCOVERY)
            return False
        return ("system:authenticated" in user.groups and a.verb == "create"
                and (a.api_group, a.resource) in SELF_REVIEWS)

    def _roles_for(self, user: User, namespace: str) -> list[list[Obj]]:
        store = self.cluster.store
        out: list[list[Obj]] = []

        def rules_of(ref: Obj, ns: str) -> list[Obj]:
            if ref.get("kind") == "ClusterRole":
                role = store.get(CLUSTER_ROLES, "", ref.get("name", ""))
            elif ref.get("kind") == "Role" and ns:
                role = store.get(ROLES, ns, ref.get("name", ""))
            else:
                role = None
            return (role or {}).get("rules") or []

        crbs, _ = store.list(CLUSTER_ROLE_BINDINGS)
        for b in crbs:
            if any(_subject_matches(s, user, "") for s in b.get("subjects") or []):
                out.append(rules_of(b.get("roleRef") or {}, ""))
        if namespace:
            rbs, _ = store.list(ROLE_BINDINGS, namespace)
            for b in rbs:
                if any(_subject_matches(s, user, namespace) for s in b.get("subjects") or []):
                    out.append(rules_of(b.get("roleRef") or {}, namespace))
        return out

    def allowed(self, user: User, a: Attributes) -> bool:
        if user.google:
            return True
        if self._builtin_allows(user, a):
            return True
        # a ClusterRoleBinding's rules apply everywhere; a RoleBinding's only in its namespace, and never
        # to cluster-scoped resources or non-resource URLs
        return any(rule_allows(rule, a) for rules in self._roles_for(user, a.namespace) for rule in rules)

    def rules_for(self, user: User, namespace: str) -> tuple[list[Obj], list[Obj]]:
        """(resourceRules, nonResourceRules) for SelfSubjectRulesReview."""
        if user.google:
            return ([{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                    [{"verbs": ["*"], "nonResourceURLs": ["*"]}])
        resource: list[Obj] = [{"verbs": ["create"], "apiGroups": [g], "resources": [r]} for g, r in
                               sorted(SELF_REVIEWS)] if "system:authenticated" in user.groups else []
        non_resource: list[Obj] = [{"verbs": ["get"], "nonResourceURLs": list(DISCOVERY)}] \
            if "system:authenticated" in user.groups else [{"verbs": ["get"], "nonResourceURLs": list(PUBLIC_INFO)}]
        for rules in self._roles_for(user, namespace):
            for rule in rules:
                if rule.get("nonResourceURLs"):
                    non_resource.append({"verbs": rule.get("verbs") or [],
                                         "nonResourceURLs": rule["nonResourceURLs"]})
                else:
                    entry = {k: rule[k] for k in ("verbs", "apiGroups", "resources", "resourceNames") if rule.get(k)}
                    resource.append(entry)
        return resource, non_resource

    # ---- the HTTP hook --------------------------------------------------------------------------
    def intercept(self, h: Any) -> bool:
        """Called before a request is routed: True if this layer answered it (401/403, TokenRequest,
        the self reviews)."""
        h.__dict__.pop("_body", None)
        try:
            user = self.authenticate(h.headers.get("Authorization"))
            a = request_attributes(h.command, h.path)
            ok = self.allowed(user, a)
            if ok and self._apply_creates(h, a):
                # server-side apply of a missing object creates it: authorized as create too (patch.go)
                a = Attributes(**{**a.__dict__, "verb": "create"})
                ok = self.allowed(user, a)
            self.audit.append((user.name, a.verb, a.api_group, a.combined if a.resource_request else a.path,
                               a.namespace, a.name, ok))
            if not ok:
                raise forbidden(user, a)
            if a.api_group == RBAC_GROUP and a.verb in ("create", "update", "patch") and not user.google:
                self._no_escalation(h, user, a)
            h.user = user
            if a.resource_request and h.command == "POST":
                if a.api_group == "" and a.resource == "serviceaccounts" and a.subresource == "token":
                    h.send_json(201, self._token_request(h, a))
                    return True
                if (a.api_group, a.resource) in SELF_REVIEWS and not a.name:
                    h.send_json(201, self._self_review(h, user, a))
                    return True
        except HttpError as err:
            h.body_bytes()  # drain so keep-alive stays in sync
            h.send_json(err.status, h.error_body(err), headers=err.headers)
            return True
        return False

    # ---- escalation prevention (pkg/registry/rbac/validation) --------------------------------------
    def _covered(self, user: User, rule: Obj, namespace: str) -> list[Obj]:
        """The parts of ``rule`` the user does not hold (each as a one-verb, one-resource rule)."""
        missing = []
        for verb in rule.get("verbs") or []:
            if rule.get("nonResourceURLs"):
                for url in rule["nonResourceURLs"]:
                    if not self.allowed(user, Attributes(verb=verb, path=url, resource_request=False)):
                        missing.append({"NonResourceURLs": [url], "Verbs": [verb]})
                continue
            for group in rule.get("apiGroups") or [""]:
                for resource in rule.get("resources") or []:
                    base, _, sub = resource.partition("/")
                    for name in rule.get("resourceNames") or [""]:
                        want = Attributes(verb=verb, path="", resource_request=True, api_group=group,
                                          namespace=namespace, resource=base, subresource=sub, name=name)
                        if not self.allowed(user, want):
                            missing.append({"APIGroups": [group], "Resources": [resource], "Verbs": [verb],
                                            **({"ResourceNames": [name]} if name else {})})
        return missing

    def _no_escalation(self, h: Any, user: User, a: Attributes) -> None:
        """A user may only create or change a Role/ClusterRole whose rules it holds itself (or with the
        ``escalate`` verb), and only bind a role whose rules it holds (or with ``bind``)."""
        body = _peek_body(h)
        if a.resource in ("roles", "clusterroles"):
            special, rules = "escalate", body.get("rules") if isinstance(body.get("rules"), list) else []
        elif a.resource in ("rolebindings", "clusterrolebindings"):
            special, ref = "bind", body.get("roleRef") or {}
            store = self.cluster.store
            role = (store.get(CLUSTER_ROLES, "", ref.get("name", "")) if ref.get("kind") == "ClusterRole"
                    else store.get(ROLES, a.namespace, ref.get("name", "")))
            rules = (role or {}).get("rules") or []
        else:
            return
        ns = a.namespace if a.resource in ("roles", "rolebindings") else ""
        if self.allowed(user, Attributes(verb=special, path="", resource_request=True, api_group=RBAC_GROUP,
                                         namespace=a.namespace, resource=a.resource.replace("bindings", "s")
                                         if special == "bind" else a.resource, name=a.name)):
            return
        missing = [m for rule in rules if isinstance(rule, dict) for m in self._covered(user, rule, ns)]
        if not missing:
            return
        groups = " ".join(f'"{g}"' for g in user.groups)
        listed = "\n".join("{" + ", ".join(f"{k}:[{' '.join(repr(x).replace(chr(39), chr(34)) for x in v)}]"
                                            for k, v in m.items()) + "}" for m in missing)
        qualified = f"{a.resource}.{RBAC_GROUP}"
        raise status_error(403, "Forbidden", f'{qualified} "{a.name or body.get("metadata", {}).get("name", "")}" '
                           f'is forbidden: user "{user.name}" (groups=[{groups}]) is attempting to grant RBAC '
                           f"permissions not currently held:\n{listed}", name=a.name or None, group=RBAC_GROUP,
                           kind=a.resource)

    def _apply_creates(self, h: Any, a: Attributes) -> bool:
        if h.command != "PATCH" or not a.name or a.subresource:
            return False
        if "apply-patch" not in (h.headers.get("Content-Type") or ""):
            return False
        t = res.find(a.api_group, a.api_version, a.resource)
        return t is not None and self.cluster.store.get(t, a.namespace if t.namespaced else "", a.name) is None

    def _json(self, h: Any) -> Obj:
        raw = h.body_bytes()
        if "protobuf" in (h.headers.get("Content-Type") or "").lower():  # kubectl 1.32+ (TokenRequest, reviews)
            return protobuf.decode(raw)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise status_error(400, "BadRequest", "the body of the request was in an unknown format - accepted "
                               "media types include: application/json, application/yaml") from None
        if not isinstance(body, dict):
            raise status_error(400, "BadRequest", "the body of the request was in an unknown format")
        return body

    def _token_request(self, h: Any, a: Attributes) -> Obj:
        body = self._json(h)
        spec = body.get("spec") or {}
        # unset (kubectl create token without --duration sends null) defaults to 1 h, as the API server does
        seconds = spec.get("expirationSeconds")
        seconds = 3600 if seconds is None else seconds
        if not isinstance(seconds, int) or seconds < 600:
            raise status_error(422, "Invalid", f'TokenRequest.authentication.k8s.io "{a.name}" is invalid: '
                               f"spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration "
                               "less than 10 minutes", name=a.name, group="authentication.k8s.io",
                               kind="TokenRequest")
        audiences = spec.get("audiences") or None
        token, exp = self.issue_sa_token(a.namespace, a.name, seconds=seconds, audiences=audiences)
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": a.name, "namespace": a.namespace, "creationTimestamp": None},
                "spec": {"audiences": audiences or [self.issuer], "expirationSeconds": seconds,
                         "boundObjectRef": spec.get("boundObjectRef")},
                "status": {"token": token,
                           "expirationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))}}

    def _self_review(self, h: Any, user: User, a: Attributes) -> Obj:
        body = self._json(h)
        spec = body.get("spec") or {}
        out: Obj = {"kind": body.get("kind") or "", "apiVersion": f"{a.api_group}/{a.api_version}",
                    "metadata": {"creationTimestamp": now_rfc3339()}, "spec": spec}
        if a.resource == "selfsubjectreviews":
            out.update(kind="SelfSubjectReview", status={"userInfo": user.info()})
            return out
        if a.resource == "selfsubjectrulesreviews":
            resource, non_resource = self.rules_for(user, spec.get("namespace") or "")
            out.update(kind="SelfSubjectRulesReview",
                       status={"resourceRules": resource, "nonResourceRules": non_resource, "incomplete": False})
            return out
        ra, nra = spec.get("resourceAttributes"), spec.get("nonResourceAttributes")
        if ra:
            want = Attributes(verb=ra.get("verb", ""), path="", resource_request=True,
                              api_group=ra.get("group", ""), namespace=ra.get("namespace", ""),
                              resource=ra.get("resource", ""), subresource=ra.get("subresource", ""),
                              name=ra.get("name", ""))
        elif nra:
            want = Attributes(verb=nra.get("verb", ""), path=nra.get("path", ""), resource_request=False)
        else:
            raise status_error(422, "Invalid", 'SelfSubjectAccessReview.authorization.k8s.io "" is invalid: '
                               "spec.resourceAttributes: Invalid value: \"null\": exactly one of "
                               "nonResourceAttributes or resourceAttributes must be specified",
                               group="authorization.k8s.io", kind="SelfSubjectAccessReview")
        ok = self.allowed(user, want)
        status: Obj = {"allowed": ok}
        if ok and not user.google:
            status["reason"] = "RBAC: allowed by the subject's role bindings"
        elif ok:
            status["reason"] = "allowed by IAM (project owner)"
        out.update(kind="SelfSubjectAccessReview", status=status)
        return out
