"""Copying a Hub revision's files into Cloud Storage: list both sides, stream one file, verify it.

Plain functions (no Prefect state): each is safe to rerun, and a copy killed anywhere leaves either no
object or an unfinished resumable session that Cloud Storage discards — never an object that looks done.
A file streams from the Hub (its LFS storage, through the 302) straight into a resumable upload in chunks;
its sha256 (LFS) or git blob id is computed on the way and compared with the Hub's before the last chunk,
which is what makes the object appear; then the object's size and crc32c/md5 from Cloud Storage are
compared with the bytes sent. The HF token stays in the request headers to the Hub only (httpx drops
Authorization on a redirect to another host, the LFS storage).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import google_crc32c
import httpx
from google.api_core import exceptions as gexc
from pydantic import SecretStr

from manifests.errors import FleetError, PreflightError
from manifests.mirror import CHECKSUM_KEY, REVISION_KEY, MirroredObject, SourceFile
from tasks.clients import hf_api, storage_client
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


def copy_file(*, model_id: str, commit: str, token: SecretStr | None, file: SourceFile, project: str, bucket: str,
              name: str, replaces: int | None, chunk_bytes: int = CHUNK_BYTES,
              on_chunk: Callable[[int], None] | None = None) -> MirroredObject:
    """Stream one Hub file into ``gs://bucket/name`` and verify it; ``replaces``: the generation of an object
    there that is not this file (None: there is none) — the upload's precondition, so two copies racing
    cannot both write. ``on_chunk(bytes_sent)`` is called after each chunk read (progress)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    if chunk_bytes % (256 * 1024):
        raise ValueError("chunk_bytes must be a multiple of 256 KiB")
    s = get_settings()
    blob = storage_client(project=project).bucket(bucket).blob(name, chunk_size=chunk_bytes)
    blob.metadata = {CHECKSUM_KEY: file.checksum, REVISION_KEY: commit, "hf-repo": model_id, "hf-path": file.path}
    digests, sent = _Digests(file.checksum, file.size), 0
    url = hf_hub_url(model_id, file.path, revision=commit, endpoint=s.hf_endpoint)
    headers = build_hf_headers(token=token.get_secret_value() if token else False)
    # No context manager around the writer: its close() sends the last chunk, which creates the object —
    # only done below, after the bytes matched the Hub's checksum.
    writer = blob.open("wb", chunk_size=chunk_bytes, content_type="application/octet-stream",
                       if_generation_match=replaces or 0, checksum="crc32c", ignore_flush=True)
    with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=s.call_timeout_s) as resp:
        resp.raise_for_status()
        for data in resp.iter_bytes(chunk_bytes):
            digests.update(data)
            writer.write(data)
            sent += len(data)
            if on_chunk is not None:
                on_chunk(sent)
    if sent != file.size or digests.checksum != file.checksum:
        raise MirrorError(f"{model_id}@{commit[:12]}/{file.path}: read {sent} bytes with {digests.checksum}, the Hub "
                          f"states {file.size} bytes with {file.checksum}; nothing was written",
                          "rerun mirror_model (a download cut short or a changed file)")
    try:
        writer.close()
    except gexc.PreconditionFailed:
        raise MirrorError(f"gs://{bucket}/{name} changed while it was copied (another mirror_model run?)",
                          "rerun mirror_model: it skips what the other run finished") from None
    blob.reload()
    if int(blob.size or 0) != file.size or blob.crc32c != digests.crc32c or blob.md5_hash != digests.md5_hash:
        blob.delete(if_generation_match=blob.generation)
        raise MirrorError(f"gs://{bucket}/{name}: Cloud Storage holds {blob.size} bytes (crc32c {blob.crc32c}), "
                          f"sent {sent} (crc32c {digests.crc32c}); the object was deleted", "rerun mirror_model")
    return MirroredObject(name, file.size, file.checksum, int(blob.generation or 0))
