"""Copying a Hub revision's files into Cloud Storage: list both sides, stream one file, verify it.

Plain functions (no Prefect state): each is safe to rerun. A file streams from the Hub (its LFS storage,
through the 302) straight into a resumable upload session, chunk by chunk; its sha256 (LFS) or git blob id
is computed on the way and compared with the Hub's before the last chunk, which is what makes the object
appear, sent with the bytes' crc32c and md5 for Cloud Storage to check (and checked again in its answer).
A copy killed anywhere leaves no object that looks done: at most an unfinished session, whose URI is kept
in a private file so that the rerun resumes it from the bytes Cloud Storage says it holds. The HF token
goes to the Hub only (httpx drops Authorization on a redirect to another host, the LFS storage).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import httpx
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from pydantic import SecretStr

from manifests.errors import FleetError, PreflightError
from manifests.mirror import CHECKSUM_KEY, REVISION_KEY, MirroredObject, SourceFile
from tasks.clients import hf_api, storage_client
from tasks.credfiles import write_private
from tasks.settings import get_settings

CHUNK_BYTES = 16 * 2**20  # a resumable upload's chunk: a multiple of 256 KiB (Cloud Storage's rule)


class MirrorError(FleetError):
    """A copied file did not match what the Hub states (or what Cloud Storage stored)."""


def revision_files(*, model_id: str, commit: str, token: SecretStr | None) -> list[SourceFile]:
    """Every file of the commit with the checksum the Hub states for it."""
    api = hf_api(token.get_secret_value() if token else None)
    out = []
    for entry in api.list_repo_tree(model_id, revision=commit, recursive=True):
        if not hasattr(entry, "size"):  # a folder
            continue
        lfs = getattr(entry, "lfs", None)
        checksum = f"sha256:{lfs.sha256}" if lfs else f"git-blob:{entry.blob_id}"
        out.append(SourceFile(entry.path, int(entry.size), checksum))
    return out


def mirrored_objects(*, project: str, bucket: str, prefix: str) -> dict[str, MirroredObject]:
    """The objects under ``prefix``, with the checksum metadata a verified copy wrote."""
    client = storage_client(project=project)
    try:
        blobs = list(client.list_blobs(bucket, prefix=prefix))
    except gexc.NotFound:
        raise PreflightError(f"bucket gs://{bucket} (startup.weights.bucket) does not exist",
                             f"gcloud storage buckets create gs://{bucket} --location=<the cluster's region>, then "
                             "rerun mirror_model") from None
    except gexc.Forbidden as exc:
        raise PreflightError(f"no access to gs://{bucket} (startup.weights.bucket): {exc.message}",
                             "grant the flows' identity roles/storage.objectAdmin on the bucket") from None
    return {b.name: MirroredObject(b.name, int(b.size or 0), (b.metadata or {}).get(CHECKSUM_KEY),
                                   int(b.generation or 0)) for b in blobs}


def bucket_bindings(*, project: str, bucket: str) -> list[dict] | None:
    """The bucket's IAM bindings; None when this identity may not read them (storage.buckets.getIamPolicy)."""
    try:
        policy = storage_client(project=project).bucket(bucket).get_iam_policy(requested_policy_version=3)
    except gexc.Forbidden:
        return None
    return [{"role": b["role"], "members": sorted(b["members"])} for b in policy.bindings]


class _Digests:
    """What a copy computes over the bytes it sends: the Hub's checksum kind, and Cloud Storage's two."""

    def __init__(self, checksum: str, size: int) -> None:
        kind = checksum.split(":", 1)[0]
        self.source = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % size)  # noqa: S324
        self.kind = kind
        self.crc = google_crc32c.Checksum()
        self.md5 = hashlib.md5()  # noqa: S324 - Cloud Storage's md5Hash

    def update(self, data: bytes) -> None:
        self.source.update(data)
        self.crc.update(data)
        self.md5.update(data)

    @property
    def checksum(self) -> str:
        return f"{self.kind}:{self.source.hexdigest()}"

    @property
    def crc32c(self) -> str:
        return base64.b64encode(self.crc.digest()).decode()

    @property
    def md5_hash(self) -> str:
        return base64.b64encode(self.md5.digest()).decode()


def _ledger(bucket: str, name: str, checksum: str) -> Path:
    """Where a started upload's session URI is kept until its object is verified: private to this user (the
    URI is the upload's credential), keyed by the object and the bytes it is meant to hold."""
    key = hashlib.sha256(f"gs://{bucket}/{name}\n{checksum}".encode()).hexdigest()[:32]
    return get_settings().kube_dir.parent / "uploads" / f"{key}.json"


def forget_upload(*, bucket: str, name: str, checksum: str) -> None:
    _ledger(bucket, name, checksum).unlink(missing_ok=True)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (408, 429, 500, 502, 503, 504)


class _Session:
    """A resumable upload's session URI, spoken to as Cloud Storage documents it: chunks with Content-Range,
    308 + Range for what it persisted, the status query after any failure, then the chunk again from there."""

    def __init__(self, uri: str, size: int, http: httpx.Client) -> None:
        self.uri, self.size, self.http = uri, size, http

    def persisted(self) -> int | None:
        """Bytes the session holds; None when it is finished or gone (expired, cancelled)."""
        r = self.http.put(self.uri, headers={"Content-Range": f"bytes */{self.size}"})
        if r.status_code == 308:
            got = r.headers.get("Range")
            return int(got.rsplit("-", 1)[1]) + 1 if got else 0
        if r.status_code in (404, 410) or r.status_code < 300:
            return None
        r.raise_for_status()
        return None

    def put(self, data: bytes, first: int, *, final: bool, goog_hash: str = "") -> tuple[int, dict | None]:
        """Send ``data`` (bytes ``first``…); returns (bytes persisted, the object when it was the last chunk)."""
        state = {"first": first, "data": data}

        def attempt() -> tuple[int, dict | None]:
            last = state["first"] + len(state["data"]) - 1
            total = str(self.size) if final else "*"
            rng = f"bytes {state['first']}-{last}/{total}" if state["data"] else f"bytes */{total}"
            headers = {"Content-Range": rng, **({"X-Goog-Hash": goog_hash} if final and goog_hash else {})}
            try:
                r = self.http.put(self.uri, content=state["data"], headers=headers)
                if r.status_code == 308:
                    got = r.headers.get("Range")
                    return (int(got.rsplit("-", 1)[1]) + 1 if got else 0), None
                r.raise_for_status()
                return self.size, r.json()
            except (httpx.TransportError, httpx.HTTPStatusError) as exc:
                if _transient(exc):  # ask what the session holds, resend from there on the next attempt
                    with contextlib.suppress(httpx.HTTPError):
                        have = self.persisted()
                        if have is not None and have > state["first"]:
                            state["data"] = state["data"][have - state["first"]:]
                            state["first"] = have
                raise

        s = get_settings()
        return Retry(predicate=_transient, initial=s.retry_initial_s, maximum=s.retry_max_s, multiplier=2.0,
                     timeout=s.retry_deadline_s)(attempt)()


def copy_file(*, model_id: str, commit: str, token: SecretStr | None, file: SourceFile, project: str, bucket: str,
              name: str, replaces: int | None, chunk_bytes: int = CHUNK_BYTES,
              on_chunk: Callable[[int], None] | None = None) -> MirroredObject:
    """Stream one Hub file into ``gs://bucket/name``, resuming the upload a killed run started, and verify it.

    ``replaces``: the generation of an object there that is not this file (None: there is none) — the
    upload's precondition, so two copies racing cannot both write. The session URI is kept (privately) until
    the object is verified: a rerun asks the session how many bytes it holds, hashes those again from the Hub
    (a hash cannot be resumed from disk) and sends only the rest. The last chunk — which creates the object —
    goes only after the bytes matched the Hub's checksum, with their crc32c and md5 for Cloud Storage to check.
    ``on_chunk(bytes_sent)`` is called after each chunk sent (progress)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    if chunk_bytes % (256 * 1024) or chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be a multiple of 256 KiB")
    s = get_settings()
    url = hf_hub_url(model_id, file.path, revision=commit, endpoint=s.hf_endpoint)
    hub_headers = build_hf_headers(token=token.get_secret_value() if token else False)
    ledger = _ledger(bucket, name, file.checksum)
    digests = _Digests(file.checksum, file.size)
    with httpx.Client(timeout=s.call_timeout_s) as gcs_http, httpx.Client(
            timeout=s.call_timeout_s, follow_redirects=True, headers=hub_headers) as hub:
        session, offset = None, 0
        if ledger.exists():
            session = _Session(json.loads(ledger.read_text())["session"], file.size, gcs_http)
            have = session.persisted()
            session, offset = (session, have) if have is not None else (None, 0)
        if session is None:
            blob = storage_client(project=project).bucket(bucket).blob(name)
            blob.metadata = {CHECKSUM_KEY: file.checksum, REVISION_KEY: commit, "hf-repo": model_id,
                             "hf-path": file.path}
            uri = blob.create_resumable_upload_session(content_type="application/octet-stream", size=file.size,
                                                       checksum=None, if_generation_match=replaces or 0)
            write_private(ledger, json.dumps({"session": uri, "object": f"gs://{bucket}/{name}",
                                              "checksum": file.checksum}))
            session = _Session(uri, file.size, gcs_http)
        if offset:  # the bytes the session already holds: hashed again, not sent again
            with hub.stream("GET", url, headers={"Range": f"bytes=0-{offset - 1}"}) as resp:
                resp.raise_for_status()
                for data in resp.iter_bytes(chunk_bytes):
                    digests.update(data)
        pos, buf = offset, bytearray()
        with hub.stream("GET", url, headers={"Range": f"bytes={offset}-"} if offset else None) as resp:
            resp.raise_for_status()
            for data in resp.iter_bytes(chunk_bytes):
                digests.update(data)
                buf += data
                while len(buf) > chunk_bytes:  # full chunks; the last one waits for the checksum
                    pos_after, _ = session.put(bytes(buf[:chunk_bytes]), pos, final=False)
                    del buf[:pos_after - pos]
                    pos = pos_after
                    if on_chunk is not None:
                        on_chunk(pos)
        sent = pos + len(buf)
        if sent != file.size or digests.checksum != file.checksum:
            raise MirrorError(f"{model_id}@{commit[:12]}/{file.path}: read {sent} bytes with {digests.checksum}, "
                              f"the Hub states {file.size} bytes with {file.checksum}; the object was not created",
                              "rerun mirror_model (a download cut short or a changed file)")
        try:
            _, obj = session.put(bytes(buf), pos, final=True,
                                 goog_hash=f"crc32c={digests.crc32c},md5={digests.md5_hash}")
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 412:
                raise MirrorError(f"gs://{bucket}/{name} changed while it was copied (another mirror_model run?)",
                                  "rerun mirror_model: it skips what the other run finished") from None
            raise MirrorError(f"Cloud Storage refused the last chunk of gs://{bucket}/{name}: "
                              f"{exc.response.status_code} {exc.response.text[:300]}", "rerun mirror_model") from None
    obj = obj or {}
    if int(obj.get("size") or -1) != file.size or obj.get("crc32c") != digests.crc32c or \
            obj.get("md5Hash") != digests.md5_hash:
        raise MirrorError(f"gs://{bucket}/{name}: Cloud Storage holds {obj.get('size')} bytes (crc32c "
                          f"{obj.get('crc32c')}), sent {sent} (crc32c {digests.crc32c})", "rerun mirror_model")
    ledger.unlink(missing_ok=True)
    return MirroredObject(name, file.size, file.checksum, int(obj.get("generation") or 0))
