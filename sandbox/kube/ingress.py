"""Ingresses that actually serve: a loopback address per Ingress, routed by host and path like the controller
its class names, enforcing what the Ingress asks for.

* Which controller: ``spec.ingressClassName`` (or the legacy ``kubernetes.io/ingress.class`` annotation)
  must name an IngressClass that exists; ``k8s.io/ingress-nginx`` is served only once ingress-nginx was
  installed (its IngressClass exists — GKE has none), ``k8s.io/ingress-gce`` is GKE's own. No controller:
  no address, nothing happens (as on a real cluster).
* Address: ``status.loadBalancer.ingress: [{ip: 127.0.0.1, ports: [{port: P, protocol: TCP}]}]`` — the
  sandbox's stand-in for the LB IP; HTTP on P, and HTTPS on a second port only when every ``spec.tls``
  secret exists (else a ``Warning`` event and no HTTPS address).
* GCE: ``kubernetes.io/ingress.global-static-ip-name`` must name a reserved global address (Compute),
  else the load balancer is not created (event, no address). Google's health checkers probe every backend
  endpoint (``sandbox.kube.gcehc``); requests go only to endpoints that pass, and with none the load balancer
  answers 502 with Google's error page. nginx routes to kube-proxy's (lagged) view of the Service.
* nginx annotations: ``auth-type: basic`` + ``auth-secret`` (the Secret's ``auth`` key in htpasswd
  form; ``$apr1$``, ``{SHA}`` and ``{PLAIN}`` entries) -> 401 with ``WWW-Authenticate``, a missing secret -> 503;
  ``limit-rps`` -> per client address, burst = rps x ``limit-burst-multiplier`` (default 5), excess
  answered 503 (ingress-nginx's default ``limit-req-status-code``); ``proxy-body-size`` -> 413.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ssl
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from sandbox.core import HttpError, JsonHandler, SandboxHTTPServer, serve
from sandbox.kube import resources as res
from sandbox.kube.gcehc import GFE_502, LbHealthChecker
from sandbox.tls import serve_tls

if TYPE_CHECKING:
    from sandbox.kube.cluster import KubeCluster

Obj = dict[str, Any]
INGRESSES = res.BY_KEY[("networking.k8s.io", "ingresses")]
CLASSES = res.BY_KEY[("networking.k8s.io", "ingressclasses")]
SECRETS = res.BY_KEY[("", "secrets")]
NGINX, GCE = "k8s.io/ingress-nginx", "k8s.io/ingress-gce"
A = "nginx.ingress.kubernetes.io/"


def _size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def check_htpasswd(content: str, user: str, password: str) -> bool:
    for line in content.splitlines():
        name, _, hashed = line.strip().partition(":")
        if name != user or not hashed:
            continue
        if hashed.startswith("{SHA}"):
            want = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()  # noqa: S324 - htpasswd -s
            return hmac.compare_digest(hashed[5:], want)
        if hashed.startswith("{PLAIN}"):
            return hmac.compare_digest(hashed[7:], password)
        if hashed.startswith("$apr1$"):  # htpasswd's default (Apache MD5), what the ingress-nginx docs make
            from passlib.hash import apr_md5_crypt

            return apr_md5_crypt.verify(password, hashed)
        return False  # bcrypt/crypt(3): not checked by the sandbox (use htpasswd -m or -s)
    return False


class _Bucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class IngressHandler(JsonHandler):
    service = "ingress"
    routes: list = []
    server: Any

    def error_body(self, err: HttpError) -> Any:
        return err.body if err.body is not None else {"error": err.message}

    def _dispatch(self) -> None:  # every path goes to the Ingress's rules
        self.__dict__.pop("_body", None)
        try:
            self.server.state.serve(self, tls=isinstance(self.connection, ssl.SSLSocket))
        except HttpError as err:
            self.body_bytes()
            body = err.message.encode()
            self.send_text(err.status, body, content_type="text/html", headers=err.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch


class _Served:
    """One Ingress's address: its HTTP (and HTTPS) server and rate-limit buckets."""

    def __init__(self, ctl: IngressController, ns: str, name: str) -> None:
        self.ctl, self.ns, self.name = ctl, ns, name
        self.http: SandboxHTTPServer = serve(IngressHandler, state=self, faults=ctl.cluster.faults)
        self.https: SandboxHTTPServer | None = None
        self.tls_key: tuple[str, ...] = ()
        self.buckets: dict[str, _Bucket] = {}
        self.lock = threading.Lock()

    def set_tls(self, pems: list[tuple[bytes, bytes]] | None) -> None:
        key = tuple(hashlib.sha256(c + k).hexdigest() for c, k in pems or [])
        if key == self.tls_key:
            return
        if self.https is not None:
            self.https.stop()
            self.https = None
        self.tls_key = key
        if not pems:
            return
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as f:
            f.write(pems[0][0] + b"\n" + pems[0][1])
            f.flush()
            ctx.load_cert_chain(f.name)
        # Each connection's handshake in its own thread, with a timeout (TLSHTTPServer), as nginx does: a
        # listening socket wrapped whole shook hands inside accept(), and one connection that never sent its
        # hello (a TCP health check, a stalled client) held every other client of the address.
        self.https = serve_tls(IngressHandler, state=self, faults=self.ctl.cluster.faults, context=ctx)

    def stop(self) -> None:
        for s in (self.http, self.https):
            if s is not None:
                with contextlib.suppress(Exception):
                    s.stop()

    # ---- one request -------------------------------------------------------------------------------
    def serve(self, h: IngressHandler, *, tls: bool) -> None:
        from sandbox.routing import proxy

        cluster = self.ctl.cluster
        ing = cluster.store.get(INGRESSES, self.ns, self.name)
        if ing is None:
            raise HttpError(404, "default backend - 404")
        host = (h.headers.get("Host") or "").split(":")[0]
        path = h.url.path
        backend = _match(ing, host, path)
        if backend is None:
            raise HttpError(404, "<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found"
                                 "</h1></center><hr><center>nginx</center></body></html>")
        ann = ing["metadata"].get("annotations") or {}
        if self.ctl.controller_of(ing) == NGINX:
            self._nginx_rules(h, ann)
        svc = backend.get("service") or {}
        if self.ctl.controller_of(ing) == GCE:  # only endpoints that pass Google's health checks (sandbox.kube.gcehc)
            ports = self.ctl.health.healthy_ports(self.ns, svc.get("name", ""))
            if not ports:
                h.body_bytes()
                h.send_text(502, GFE_502, content_type="text/html; charset=UTF-8", headers={"Referrer-Policy": "no-referrer"})
                return
        else:
            ports = cluster.routed_backends(self.ns, svc.get("name", ""))
        if not ports:
            raise HttpError(503, "<html><head><title>503 Service Temporarily Unavailable</title></head><body>"
                                 "<center><h1>503 Service Temporarily Unavailable</h1></center></body></html>")
        full = path + (f"?{h.url.query}" if h.url.query else "")
        extra = {"X-Forwarded-Proto": "https" if tls else "http", "X-Forwarded-Host": host}
        proxy(h, ports, full, service=svc.get("name"), headers=extra, drop_headers=("Authorization",)
              if ann.get(A + "auth-type") == "basic" else ())

    def _nginx_rules(self, h: IngressHandler, ann: dict[str, str]) -> None:
        if ann.get(A + "auth-type") == "basic":
            ref = ann.get(A + "auth-secret", "")
            ns, _, name = ref.rpartition("/") if "/" in ref else (self.ns, "", ref)
            secret = self.ctl.cluster.store.get(SECRETS, ns or self.ns, name)
            content = (secret or {}).get("data", {}).get("auth")
            if secret is None or content is None:
                raise HttpError(503, "<html><head><title>503 Service Temporarily Unavailable</title></head></html>")
            realm = ann.get(A + "auth-realm", "")
            user, password = "", ""
            auth = h.headers.get("Authorization") or ""
            if auth.lower().startswith("basic "):
                with contextlib.suppress(ValueError):
                    user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if not check_htpasswd(base64.b64decode(content).decode(), user, password):
                raise HttpError(401, "<html><head><title>401 Authorization Required</title></head></html>",
                                headers={"WWW-Authenticate": f'Basic realm="{realm}"'})
        if ann.get(A + "limit-rps"):
            rps = float(ann[A + "limit-rps"])
            burst = rps * float(ann.get(A + "limit-burst-multiplier", "5"))
            client = h.client_address[0]
            with self.lock:
                bucket = self.buckets.setdefault(client, _Bucket(rps, burst))
                allowed = bucket.take()
            if not allowed:
                raise HttpError(int(ann.get(A + "limit-req-status-code", "503")),
                                "<html><head><title>503 Service Temporarily Unavailable</title></head></html>")
        size = ann.get(A + "proxy-body-size")
        if size and size != "0" and int(h.headers.get("Content-Length") or 0) > _size(size):
            raise HttpError(413, "<html><head><title>413 Request Entity Too Large</title></head></html>")


def _match(ing: Obj, host: str, path: str) -> Obj | None:
    spec = ing.get("spec") or {}
    best: tuple[int, Obj] | None = None
    for rule in spec.get("rules") or []:
        rh = rule.get("host")
        if rh and not (rh == host or (rh.startswith("*.") and host.endswith(rh[1:]) and host.count(".") ==
                                      rh.count("."))):
            continue
        for p in (rule.get("http") or {}).get("paths") or []:
            want = p.get("path") or "/"
            kind = p.get("pathType", "Prefix")
            if kind == "Exact":
                ok = path == want
            else:
                ok = want == "/" or path == want.rstrip("/") or path.startswith(want.rstrip("/") + "/")
            if ok and (best is None or len(want) > best[0]):
                best = (len(want), p.get("backend") or {})
    if best is not None:
        return best[1]
    return spec.get("defaultBackend")


class IngressController:
    """Subscribes to the cluster; keeps one served address per Ingress its controllers would serve."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.served: dict[tuple[str, str], _Served] = {}
        self.static_ip: Any = None  # name -> address str or None (set by whoever knows Compute)
        self._lock = threading.Lock()
        self.health = LbHealthChecker(cluster, self)  # Google's health checkers on GCE backends
        cluster.subscribe(self.on_event)

    def controller_of(self, ing: Obj) -> str | None:
        name = (ing.get("spec") or {}).get("ingressClassName") or \
            (ing["metadata"].get("annotations") or {}).get("kubernetes.io/ingress.class")
        if not name:
            return None
        cls = self.cluster.store.get(CLASSES, "", name)
        return ((cls or {}).get("spec") or {}).get("controller")

    def on_event(self, etype: str, obj: Obj) -> None:
        kind = obj.get("kind")
        if kind == "Ingress":
            self.sync(obj["metadata"]["namespace"], obj["metadata"]["name"])
            self.health.poke()
        elif kind in ("Endpoints", "BackendConfig") and self.served:
            self.health.poke(endpoints_changed=kind == "Endpoints")
        elif kind in ("IngressClass", "Secret"):
            for ing in self.cluster.store.list(INGRESSES, None)[0]:
                self.sync(ing["metadata"]["namespace"], ing["metadata"]["name"])

    def _event(self, ing: Obj, reason: str, message: str, component: str) -> None:
        self.cluster.controller.event(ing, "Warning", reason, message, component=component)

    def sync(self, ns: str, name: str) -> None:
        ing = self.cluster.store.get(INGRESSES, ns, name)
        key = (ns, name)
        controller = self.controller_of(ing) if ing is not None else None
        ann = (ing or {}).get("metadata", {}).get("annotations") or {}
        component = "nginx-ingress-controller" if controller == NGINX else "loadbalancer-controller"
        if controller == GCE and ann.get("kubernetes.io/ingress.global-static-ip-name"):
            ip_name = ann["kubernetes.io/ingress.global-static-ip-name"]
            if self.static_ip is not None and not self.static_ip(ip_name):
                self._event(ing, "Sync", "Error syncing to GCP: error running load balancer syncing routine: "
                            f"the given static IP name {ip_name} doesn't translate to an existing static IP.",
                            component)
                controller = None
        with self._lock:
            served = self.served.get(key)
            if ing is None or controller not in (NGINX, GCE):
                if served is not None:
                    served.stop()
                    del self.served[key]
                    self._status(ns, name, None)
                return
            if served is None:
                served = self.served[key] = _Served(self, ns, name)
        if controller == GCE:
            self.health.start()  # Google's checkers probe the backends from now on, traffic or not
        pems, missing = [], []
        for tls in (ing.get("spec") or {}).get("tls") or []:
            secret = self.cluster.store.get(SECRETS, ns, tls.get("secretName", ""))
            data = (secret or {}).get("data") or {}
            if "tls.crt" in data and "tls.key" in data:
                pems.append((base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"])))
            else:
                missing.append(tls.get("secretName", ""))
        if missing:
            self._event(ing, "Sync" if controller == GCE else "TLS",
                        f"error getting SSL certificate \"{ns}/{missing[0]}\": secret \"{missing[0]}\" not found; "
                        "no HTTPS address", component)
        try:
            served.set_tls(pems if pems and not missing else None)
        except (ssl.SSLError, OSError) as exc:
            self._event(ing, "TLS", f"invalid TLS secret: {exc}", component)
            served.set_tls(None)
        self._status(ns, name, served)

    def _status(self, ns: str, name: str, served: _Served | None) -> None:
        want: Obj = {"loadBalancer": {}}
        if served is not None:
            ports = [{"port": served.http.port, "protocol": "TCP"}]
            if served.https is not None:
                ports.append({"port": served.https.port, "protocol": "TCP"})
            want = {"loadBalancer": {"ingress": [{"ip": "127.0.0.1", "ports": ports}]}}

        def fn(o: Obj) -> Obj | None:
            if o.get("status") == want:
                return None
            o["status"] = want
            return o

        with contextlib.suppress(Exception):
            self.cluster.store.mutate(INGRESSES, ns, name, fn)

    def url(self, ns: str, name: str, *, https: bool = False) -> str | None:
        served = self.served.get((ns, name))
        srv = (served.https if https else served.http) if served is not None else None
        return f"{'https' if https else 'http'}://127.0.0.1:{srv.port}" if srv is not None else None

    def stop(self) -> None:
        self.health.stop()
        with self._lock:
            for s in self.served.values():
                s.stop()
            self.served.clear()
