"""Cloud Storage JSON API emulator: buckets, objects and the uploads ``google-cloud-storage`` makes.

Reached by the real client with ``storage.Client(project=P, credentials=..., client_options={"api_endpoint":
gcs.url})`` (the env file's ``LLM_FLEET_STORAGE_ENDPOINT``); fault service ``"gcs"``.

==========================================================  ====================================================
``POST /storage/v1/b?project=P``                            create a bucket (409 if it exists)
``GET  /storage/v1/b/{bucket}``                             bucket metadata
``GET  /storage/v1/b/{bucket}/iam``                         the bucket's IAM policy (project members only)
``GET  /storage/v1/b/{bucket}/o``                           list (``prefix``, ``delimiter``, ``maxResults``,
                                                            ``pageToken``)
``GET  /storage/v1/b/{bucket}/o/{object}``                  object metadata (``alt=media``: its bytes)
``GET  /download/storage/v1/b/{bucket}/o/{object}``         the bytes (``Range``; ``X-Goog-Hash`` on the reply)
``DELETE /storage/v1/b/{bucket}/o/{object}``                delete (204)
``POST /upload/storage/v1/b/{bucket}/o?uploadType=media``   one-shot upload of the body (``name=`` in the query)
``POST ...?uploadType=multipart``                           ``multipart/related``: JSON metadata, then the bytes
``POST ...?uploadType=resumable``                           starts a session: 200 with ``Location`` = session URI
``PUT  <session URI>``                                      a chunk (``Content-Range: bytes A-B/*``, the last
                                                            ``bytes A-B/TOTAL``) or a status query (``bytes
                                                            */TOTAL``): 308 with ``Range: bytes=0-N`` until the
                                                            last, then 200 and the object; ``DELETE`` cancels
==========================================================  ====================================================

As GCS does (sources in docs/sandbox-contract.md): every chunk but the last is a multiple of 256 KiB, else
only the whole 256 KiB blocks are kept and ``Range`` says so; a chunk may repeat bytes already persisted but
not skip any (400); the session URI is the credential of its upload (no ``Authorization`` needed), the
object appears only when the last byte arrives, and an ``X-Goog-Hash`` on that request that does not match
the bytes is a 400 (no object). Objects carry ``md5Hash`` and ``crc32c`` (base64, big-endian) and a
``generation`` that changes on every write; ``ifGenerationMatch`` (0 = only if absent) and
``ifMetagenerationMatch`` preconditions answer 412. Every JSON API call needs a valid Google access token
(401), and the caller's permission on the bucket: members of the bucket's project have all, others only
what :meth:`Gcs.grant` gave them (``roles/storage.objectViewer`` or ``roles/storage.objectAdmin``), else
403 "... does not have storage.objects.X access ...".

Objects are held in memory: the sandbox is for small copies (the Hub serves weight files up to
``sandbox.hub.DOWNLOADABLE_LFS_BYTES``).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import json
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import google_crc32c

from sandbox.core import Clock, Emulator, Faults, HttpError, JsonHandler, SandboxHTTPServer, route

CHUNK_GRANULARITY = 256 * 1024  # "chunk size ... must be a multiple of 256 KiB" (resumable uploads page)
BUCKET_NAME = re.compile(r"^[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9]$")
VIEWER, ADMIN = "roles/storage.objectViewer", "roles/storage.objectAdmin"
_READ = {"storage.objects.get", "storage.objects.list", "storage.buckets.get"}
_ROUTES: list = []
_B = r"/storage/v1/b/(?P<bucket>[^/]+)"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def crc32c_b64(data: bytes) -> str:
    """GCS's ``crc32c`` field: base64 of the big-endian CRC32C."""
    return _b64(struct.pack(">I", google_crc32c.value(data)))


def md5_b64(data: bytes) -> str:
    return _b64(hashlib.md5(data).digest())  # noqa: S324 - GCS's md5Hash field, not security


def _rfc3339(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


@dataclass
class Blob:
    name: str
    data: bytes
    generation: int
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)
    metageneration: int = 1
    created: float = field(default_factory=time.time)
    md5: str = ""
    crc32c: str = ""

    def __post_init__(self) -> None:
        self.md5 = self.md5 or md5_b64(self.data)
        self.crc32c = self.crc32c or crc32c_b64(self.data)


@dataclass
class Bucket:
    name: str
    project: str
    location: str = "US"
    storage_class: str = "STANDARD"
    created: float = field(default_factory=time.time)
    objects: dict[str, Blob] = field(default_factory=dict)
    grants: dict[str, str] = field(default_factory=dict)  # IAM member ("serviceAccount:…", "principal://…") -> role


@dataclass
class Session:
    upload_id: str
    bucket: str
    name: str
    content_type: str
    metadata: dict[str, str]
    preconditions: dict[str, int]
    total: int | None = None  # X-Upload-Content-Length, or learnt from a Content-Range
    data: bytearray = field(default_factory=bytearray)  # the persisted bytes
    result: Blob | None = None  # set when the last byte arrived
    chunks: int = 0


class Gcs(Emulator):
    """Cloud Storage on 127.0.0.1 (service ``"gcs"`` for faults)."""

    def __init__(self, *, clock: Clock, faults: Faults, tokens: Any, project: str) -> None:
        self.clock = clock
        self.faults = faults
        self.tokens = tokens  # sandbox.tokens.GoogleTokens: who a bearer token is
        self.project = project
        self.buckets: dict[str, Bucket] = {}
        self.sessions: dict[str, Session] = {}
        self._lock = threading.RLock()
        self._generation = 0
        self.bytes_received = 0  # resumable-upload chunk bytes that reached the service, resent ones included
        self._handler = GcsHandler
        self._server: SandboxHTTPServer | None = None

    # ---- Python API for tests and the control API -----------------------------------------------
    def add_bucket(self, name: str, *, project: str | None = None, location: str = "US") -> Bucket:
        if not BUCKET_NAME.match(name):
            raise ValueError(f"invalid bucket name {name!r}")
        with self._lock:
            return self.buckets.setdefault(name, Bucket(name, project or self.project, location))

    def grant(self, bucket: str, member: str, role: str = VIEWER) -> None:
        """A bucket-level IAM binding; ``member`` is an email (a service account's or a user's) or an IAM
        member string (``principal://…`` for a Kubernetes service account through Workload Identity)."""
        if role not in (VIEWER, ADMIN):
            raise ValueError(f"role must be {VIEWER} or {ADMIN}")
        with self._lock:
            self.buckets[bucket].grants[_member(member)] = role

    def objects(self, bucket: str, prefix: str = "") -> dict[str, Blob]:
        with self._lock:
            return {n: b for n, b in self.buckets[bucket].objects.items() if n.startswith(prefix)}

    def _next_generation(self) -> int:
        with self._lock:  # microseconds since the epoch, as GCS's generations are; strictly increasing
            self._generation = max(self._generation + 1, time.time_ns() // 1000)
            return self._generation

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"buckets": {b.name: {"project": b.project, "location": b.location, "grants": dict(b.grants),
                                         "objects": {n: {"size": len(o.data), "generation": o.generation,
                                                         "crc32c": o.crc32c, "md5Hash": o.md5}
                                                     for n, o in sorted(b.objects.items())}}
                                for b in self.buckets.values()},
                    "sessions": {s.upload_id: {"bucket": s.bucket, "name": s.name, "persisted": len(s.data),
                                               "total": s.total, "done": s.result is not None, "chunks": s.chunks}
                                 for s in self.sessions.values()},
                    "bytes_received": self.bytes_received}

    # ---- rules shared by the routes ----------------------------------------------------------------
    def caller(self, h: GcsHandler, permission: str, bucket: str, obj: str | None = None) -> str:
        """The caller's email once it may do ``permission`` on the bucket (401/403/404 otherwise)."""
        auth = h.headers.get("Authorization") or ""
        who, expired = self.tokens.check(auth.removeprefix("Bearer ").strip()) if auth.startswith(
            "Bearer ") else (None, False)
        what = (f"the Google Cloud Storage object. Permission '{permission}' denied on resource (or it may not "
                f"exist)." if obj is not None else f"the Google Cloud Storage bucket. Permission '{permission}' "
                f"denied on resource (or it may not exist).")
        if who is None or expired:
            raise _error(401, f"Anonymous caller does not have {permission} access to {what}" if not auth else
                         "Invalid Credentials", "required" if not auth else "authError")
        b = self.buckets.get(bucket)
        if b is None:
            raise _error(404, "The specified bucket does not exist.", "notFound")
        role = ADMIN if who.endswith(f"@{b.project}.iam.gserviceaccount.com") else b.grants.get(_member(who))
        if role == ADMIN or (role == VIEWER and permission in _READ):
            return who
        raise _error(403, f"{who} does not have {permission} access to {what}", "forbidden")

    def blob_json(self, bucket: str, blob: Blob) -> dict[str, Any]:
        quoted = quote(blob.name, safe="")
        out = {"kind": "storage#object", "id": f"{bucket}/{blob.name}/{blob.generation}",
               "selfLink": f"{self.url}/storage/v1/b/{bucket}/o/{quoted}",
               "mediaLink": f"{self.url}/download/storage/v1/b/{bucket}/o/{quoted}?generation={blob.generation}"
                            "&alt=media",
               "name": blob.name, "bucket": bucket, "generation": str(blob.generation),
               "metageneration": str(blob.metageneration), "contentType": blob.content_type,
               "storageClass": self.buckets[bucket].storage_class, "size": str(len(blob.data)),
               "md5Hash": blob.md5, "crc32c": blob.crc32c,
               "etag": _b64(struct.pack(">Q", blob.generation))[:-1] + "E",
               "timeCreated": _rfc3339(blob.created), "updated": _rfc3339(blob.created),
               "timeStorageClassUpdated": _rfc3339(blob.created)}
        if blob.metadata:
            out["metadata"] = dict(blob.metadata)
        return out

    def check_preconditions(self, bucket: str, name: str, cond: dict[str, int]) -> None:
        current = self.buckets[bucket].objects.get(name)
        gen, meta = (current.generation, current.metageneration) if current else (0, 0)
        if ("ifGenerationMatch" in cond and cond["ifGenerationMatch"] != gen) or (
                "ifGenerationNotMatch" in cond and cond["ifGenerationNotMatch"] == gen) or (
                "ifMetagenerationMatch" in cond and (current is None or cond["ifMetagenerationMatch"] != meta)):
            raise _error(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")

    def write(self, bucket: str, name: str, data: bytes, *, content_type: str, metadata: dict[str, str],
              preconditions: dict[str, int], goog_hash: str | None) -> Blob:
        """Store a new generation of ``name`` (the one place an object is written)."""
        blob = Blob(name, bytes(data), 0, content_type or "application/octet-stream", dict(metadata))
        for part in (goog_hash or "").split(","):
            kind, _, value = part.strip().partition("=")
            mine = {"crc32c": blob.crc32c, "md5": blob.md5}.get(kind)
            if mine is not None and value != mine:
                label = "CRC32C" if kind == "crc32c" else "MD5"
                raise _error(400, f'Provided {label} "{value}" doesn\'t match calculated {label} "{mine}".',
                             "invalid")
        with self._lock:
            if bucket not in self.buckets:
                raise _error(404, "The specified bucket does not exist.", "notFound")
            self.check_preconditions(bucket, name, preconditions)
            blob.generation = self._next_generation()
            self.buckets[bucket].objects[name] = blob
        return blob


def _member(who: str) -> str:
    if ":" in who:
        return who
    return ("serviceAccount:" if who.endswith(".gserviceaccount.com") else "user:") + who


def _error(status: int, message: str, reason: str) -> HttpError:
    """GCS's JSON error shape (google-api-core maps the status to NotFound, Forbidden, ...)."""
    return HttpError(status, message, body={"error": {"code": status, "message": message, "errors": [
        {"message": message, "domain": "global", "reason": reason}]}})


def _object_name(name: str) -> str:
    if not name or len(name.encode()) > 1024 or "\r" in name or "\n" in name or name in (".", ".."):
        raise _error(400, "The specified object name is not valid.", "invalid")
    return name


class GcsHandler(JsonHandler):
    service = "gcs"
    routes = _ROUTES

    @property
    def gcs(self) -> Gcs:
        return self.server.state

    def preconditions(self) -> dict[str, int]:
        out = {}
        for key in ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch"):
            value = self.q(key)
            if value is not None:
                try:
                    out[key] = int(value)
                except ValueError as exc:
                    raise _error(400, f"Invalid argument for {key}: {value}", "invalid") from exc
        return out


# ---- buckets ------------------------------------------------------------------------------------------

@route(_ROUTES, "POST", r"/storage/v1/b")
def _create_bucket(h: GcsHandler):
    body, project = h.json_body(), h.q("project") or ""
    name = str(body.get("name") or "")
    auth = h.headers.get("Authorization") or ""
    who, expired = h.gcs.tokens.check(auth.removeprefix("Bearer ").strip())
    if who is None or expired:
        raise _error(401, "Invalid Credentials", "authError")
    if not BUCKET_NAME.match(name):
        raise _error(400, "Invalid bucket name: " + repr(name), "invalid")
    if not who.endswith(f"@{project}.iam.gserviceaccount.com"):
        raise _error(403, f"{who} does not have storage.buckets.create access to the Google Cloud project. "
                     "Permission 'storage.buckets.create' denied on resource (or it may not exist).", "forbidden")
    with h.gcs._lock:
        if name in h.gcs.buckets:
            raise _error(409, "Your previous request to create the named bucket succeeded and you already own it."
                         if h.gcs.buckets[name].project == project else "The requested bucket name is not "
                         "available. The bucket namespace is shared by all users of the system. Please select a "
                         "different name and try again.", "conflict")
        b = h.gcs.add_bucket(name, project=project, location=str(body.get("location") or "US").upper())
    return _bucket_json(b)


def _bucket_json(b: Bucket) -> dict[str, Any]:
    return {"kind": "storage#bucket", "id": b.name, "name": b.name, "projectNumber": str(abs(hash(b.project)) % 10**12),
            "location": b.location, "locationType": "multi-region" if b.location in ("US", "EU", "ASIA") else "region",
            "storageClass": b.storage_class, "metageneration": "1", "etag": "CAE=",
            "timeCreated": _rfc3339(b.created), "updated": _rfc3339(b.created),
            "iamConfiguration": {"uniformBucketLevelAccess": {"enabled": True},
                                 "publicAccessPrevention": "enforced"}}


@route(_ROUTES, "GET", _B)
def _get_bucket(h: GcsHandler, bucket: str):
    h.gcs.caller(h, "storage.buckets.get", bucket)
    return _bucket_json(h.gcs.buckets[bucket])


@route(_ROUTES, "GET", _B + r"/iam")
def _get_iam(h: GcsHandler, bucket: str):
    """The bucket's IAM policy: the project's convenience bindings (as every bucket has) and its grants."""
    who = h.gcs.caller(h, "storage.buckets.getIamPolicy", bucket)
    b = h.gcs.buckets[bucket]
    if not who.endswith(f"@{b.project}.iam.gserviceaccount.com"):  # objectViewer/objectAdmin cannot read it
        raise _error(403, f"{who} does not have storage.buckets.getIamPolicy access to the Google Cloud Storage "
                     "bucket. Permission 'storage.buckets.getIamPolicy' denied on resource (or it may not exist).",
                     "forbidden")
    roles: dict[str, list[str]] = {"roles/storage.legacyBucketOwner": [f"projectEditor:{b.project}",
                                                                       f"projectOwner:{b.project}"],
                                   "roles/storage.legacyBucketReader": [f"projectViewer:{b.project}"]}
    with h.gcs._lock:
        for member, role in sorted(b.grants.items()):
            roles.setdefault(role, []).append(member)
    return {"kind": "storage#policy", "resourceId": f"projects/_/buckets/{bucket}", "version": 1, "etag": "CAE=",
            "bindings": [{"role": r, "members": m} for r, m in roles.items()]}


# ---- objects ------------------------------------------------------------------------------------------

@route(_ROUTES, "GET", _B + r"/o")
def _list(h: GcsHandler, bucket: str):
    h.gcs.caller(h, "storage.objects.list", bucket)
    prefix, delimiter = h.q("prefix") or "", h.q("delimiter") or ""
    page_size = max(1, min(int(h.q("maxResults") or 1000), 1000))
    start = base64.urlsafe_b64decode(h.q("pageToken") or "").decode() if h.q("pageToken") else ""
    items, prefixes, last = [], set(), ""
    with h.gcs._lock:
        names = sorted(n for n in h.gcs.buckets[bucket].objects if n.startswith(prefix) and n > start)
        for name in names:
            if len(items) + len(prefixes) >= page_size:
                break
            rest = name[len(prefix):]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
            else:
                items.append(h.gcs.blob_json(bucket, h.gcs.buckets[bucket].objects[name]))
            last = name
        more = bool(names) and last != names[-1]
    out: dict[str, Any] = {"kind": "storage#objects"}
    if items:
        out["items"] = items
    if prefixes:
        out["prefixes"] = sorted(prefixes)
    if more:
        out["nextPageToken"] = base64.urlsafe_b64encode(last.encode()).decode()
    return out


def _blob(h: GcsHandler, bucket: str, obj: str, permission: str) -> Blob:
    name = unquote(obj)
    h.gcs.caller(h, permission, bucket, name)
    with h.gcs._lock:
        blob = h.gcs.buckets[bucket].objects.get(name)
    generation = h.q("generation")
    if blob is None or (generation is not None and generation != str(blob.generation)):
        raise _error(404, f"No such object: {bucket}/{name}", "notFound")
    h.gcs.check_preconditions(bucket, name, h.preconditions())
    return blob


@route(_ROUTES, "GET", _B + r"/o/(?P<obj>.+)")
def _get_object(h: GcsHandler, bucket: str, obj: str):
    blob = _blob(h, bucket, obj, "storage.objects.get")
    if h.q("alt") == "media":
        return _media(h, bucket, blob)
    return h.gcs.blob_json(bucket, blob)


@route(_ROUTES, "GET", r"/download" + _B + r"/o/(?P<obj>.+)")
def _download(h: GcsHandler, bucket: str, obj: str):
    return _media(h, bucket, _blob(h, bucket, obj, "storage.objects.get"))


def _media(h: GcsHandler, bucket: str, blob: Blob):
    data, status, headers = blob.data, 200, {
        "X-Goog-Hash": f"crc32c={blob.crc32c},md5={blob.md5}", "X-Goog-Generation": str(blob.generation),
        "X-Goog-Metageneration": str(blob.metageneration), "X-Goog-Stored-Content-Length": str(len(blob.data)),
        "X-Goog-Stored-Content-Encoding": "identity", "Accept-Ranges": "bytes",
        "ETag": h.gcs.blob_json(bucket, blob)["etag"]}
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
    if m:
        first, last = int(m.group(1)), int(m.group(2)) if m.group(2) else len(data) - 1
        if first >= len(data) and len(data):
            raise HttpError(416, "Request range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
        last = min(last, len(data) - 1)
        data, status = data[first:last + 1], 206
        headers["Content-Range"] = f"bytes {first}-{last}/{len(blob.data)}"
    h.send_text(status, data, content_type=blob.content_type, headers=headers)
    return None


@route(_ROUTES, "DELETE", _B + r"/o/(?P<obj>.+)")
def _delete(h: GcsHandler, bucket: str, obj: str):
    name = _blob(h, bucket, obj, "storage.objects.delete").name
    with h.gcs._lock:
        h.gcs.buckets[bucket].objects.pop(name, None)
    h.send_text(204, b"", content_type="application/json")
    return None


# ---- uploads ------------------------------------------------------------------------------------------

@route(_ROUTES, "POST", r"/upload" + _B + r"/o")
def _upload(h: GcsHandler, bucket: str):
    kind = h.q("uploadType")
    cond = h.preconditions()
    if kind == "media":
        name = _object_name(h.q("name") or "")
        h.gcs.caller(h, "storage.objects.create", bucket, name)
        blob = h.gcs.write(bucket, name, h.body_bytes(), content_type=h.headers.get("Content-Type") or "",
                           metadata={}, preconditions=cond, goog_hash=h.headers.get("X-Goog-Hash"))
        return h.gcs.blob_json(bucket, blob)
    if kind == "multipart":
        meta, data, ctype = _multipart(h)
        name = _object_name(str(meta.get("name") or h.q("name") or ""))
        h.gcs.caller(h, "storage.objects.create", bucket, name)
        blob = h.gcs.write(bucket, name, data, content_type=str(meta.get("contentType") or ctype),
                           metadata=dict(meta.get("metadata") or {}), preconditions=cond,
                           goog_hash=h.headers.get("X-Goog-Hash"))
        return h.gcs.blob_json(bucket, blob)
    if kind == "resumable":
        meta = h.json_body() if h.body_bytes() else {}
        name = _object_name(str(meta.get("name") or h.q("name") or ""))
        h.gcs.caller(h, "storage.objects.create", bucket, name)
        with h.gcs._lock:
            h.gcs.check_preconditions(bucket, name, cond)
        length = h.headers.get("X-Upload-Content-Length")
        session = Session(secrets.token_urlsafe(24), bucket, name,
                          str(meta.get("contentType") or h.headers.get("X-Upload-Content-Type") or ""),
                          dict(meta.get("metadata") or {}), cond, total=int(length) if length else None)
        with h.gcs._lock:
            h.gcs.sessions[session.upload_id] = session
        location = (f"{h.gcs.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&name="
                    f"{quote(name, safe='')}&upload_id={session.upload_id}")
        h.send_text(200, b"", content_type="text/plain; charset=utf-8", headers={"Location": location})
        return None
    raise _error(400, f"Invalid upload type: {kind!r} (media, multipart or resumable)", "invalid")


def _multipart(h: GcsHandler) -> tuple[dict[str, Any], bytes, str]:
    ctype = h.headers.get("Content-Type") or ""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + h.body_bytes())
    parts = list(msg.iter_parts()) if msg.is_multipart() else []
    if len(parts) != 2:
        raise _error(400, "Multipart upload needs exactly two parts: metadata, then media.", "invalid")
    try:
        meta = json.loads(parts[0].get_payload(decode=True) or b"{}")
    except ValueError as exc:
        raise _error(400, f"Metadata part is not JSON: {exc}", "parseError") from exc
    return meta, parts[1].get_payload(decode=True) or b"", parts[1].get_content_type()


def _session(h: GcsHandler, bucket: str) -> Session:
    with h.gcs._lock:
        session = h.gcs.sessions.get(h.q("upload_id") or "")
    if session is None or session.bucket != bucket:
        raise _error(404, "No such upload session.", "notFound")
    return session


def _incomplete(h: GcsHandler, session: Session) -> None:
    """308 Resume Incomplete: ``Range`` = what the server has (none: no header)."""
    headers = {"Range": f"bytes=0-{len(session.data) - 1}"} if session.data else {}
    h.send_text(308, b"", content_type="text/plain; charset=utf-8", headers=headers)


@route(_ROUTES, "PUT", r"/upload" + _B + r"/o")
def _put_chunk(h: GcsHandler, bucket: str):
    """A chunk of a resumable upload; the session URI is its credential (no Authorization)."""
    session, body = _session(h, bucket), h.body_bytes()
    if session.result is not None:  # finished: the object again, as GCS answers a retried last chunk
        return h.gcs.blob_json(bucket, session.result)
    header = h.headers.get("Content-Range") or ""
    status_query = re.fullmatch(r"bytes \*/(\d+|\*)", header)
    chunk = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header)
    if status_query is None and chunk is None:
        raise _error(400, f"Failed to parse Content-Range header: {header!r}", "invalid")
    total_s = (status_query or chunk).group(status_query and 1 or 3)  # type: ignore[union-attr]
    total = None if total_s == "*" else int(total_s)
    with h.gcs._lock:
        if total is not None and session.total is not None and total != session.total:
            raise _error(400, f"The total size {total} does not match the upload's {session.total}.", "invalid")
        session.total = total if total is not None else session.total
        if chunk is not None:
            first, last = int(chunk.group(1)), int(chunk.group(2))
            if last - first + 1 != len(body):
                raise _error(400, "Content-Range does not match the request body's length.", "invalid")
            have = len(session.data)
            if first > have:
                raise _error(400, f"Invalid request. According to the Content-Range header, the upload offset is "
                             f"{first} byte(s), which exceeds already uploaded size of {have} byte(s).", "invalid")
            session.data += body[have - first:]
            session.chunks += 1
            h.gcs.bytes_received += len(body)
        done = session.total is not None and len(session.data) >= session.total
        if not done and chunk is not None:  # only whole 256 KiB blocks of a non-final chunk are kept
            del session.data[len(session.data) // CHUNK_GRANULARITY * CHUNK_GRANULARITY:]
    if not done:
        _incomplete(h, session)
        return None
    blob = h.gcs.write(bucket, session.name, bytes(session.data[:session.total]), content_type=session.content_type,
                       metadata=session.metadata, preconditions=session.preconditions,
                       goog_hash=h.headers.get("X-Goog-Hash"))
    with h.gcs._lock:
        session.result = blob
        session.data = bytearray()
    return h.gcs.blob_json(bucket, blob)


@route(_ROUTES, "DELETE", r"/upload" + _B + r"/o")
def _cancel(h: GcsHandler, bucket: str):
    session = _session(h, bucket)
    with h.gcs._lock:
        h.gcs.sessions.pop(session.upload_id, None)
    h.send_text(499, b"", content_type="text/plain; charset=utf-8")  # GCS: 499 Client Closed Request
    return None
