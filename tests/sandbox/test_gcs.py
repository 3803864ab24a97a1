"""The Cloud Storage emulator with the real google-cloud-storage client (and raw HTTP for the resumable
protocol's edges); the Hub's LFS downloads that mirror_model streams from."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
from pathlib import Path

import google_crc32c
import httpx
import pytest
from google.api_core import exceptions as gexc
from google.cloud import storage
from google.oauth2.credentials import Credentials

from sandbox.core import Clock, Faults
from sandbox.gcs import Gcs
from sandbox.hub import Hub
from sandbox.tokens import GoogleTokens

P = "gcs-test-project"
KIB = 1024


@pytest.fixture(scope="module")
def env():
    clock, faults = Clock(0.01), Faults()
    tokens = GoogleTokens(clock=clock, lifetime_s=3600)
    gcs = Gcs(clock=clock, faults=faults, tokens=tokens, project=P)
    hub = Hub(faults=faults, clock=clock)
    gcs.start()
    hub.start()
    owner, _ = tokens.issue(f"flows@{P}.iam.gserviceaccount.com")
    stranger, _ = tokens.issue("someone@other-project.iam.gserviceaccount.com")
    yield gcs, hub, owner, stranger
    gcs.stop()
    hub.stop()


def client(gcs: Gcs, token: str) -> storage.Client:
    return storage.Client(project=P, credentials=Credentials(token), client_options={"api_endpoint": gcs.url})


def crc32c(data: bytes) -> str:
    return base64.b64encode(struct.pack(">I", google_crc32c.value(data))).decode()


def test_resumable_upload_in_chunks_keeps_crc32c_and_md5(env):
    gcs, _, owner, _ = env
    c = client(gcs, owner)
    bucket = c.create_bucket("chunked-bucket")
    data = bytes(range(256)) * (3 * 1024 + 7)  # 3 chunks of 256 KiB and a short last one
    blob = bucket.blob("dir/file.bin", chunk_size=256 * KIB)
    blob.metadata = {"k": "v"}
    blob.upload_from_file(io.BytesIO(data), checksum="crc32c")  # no size: resumable (8 MiB or less: multipart)
    got = bucket.get_blob("dir/file.bin")
    assert got.size == len(data) and got.crc32c == crc32c(data) and got.metadata == {"k": "v"}
    assert got.md5_hash == base64.b64encode(hashlib.md5(data).digest()).decode()  # noqa: S324
    (session,) = [s for s in gcs.snapshot()["sessions"].values() if s["name"] == "dir/file.bin"]
    assert session["done"] and session["chunks"] == 4
    assert got.download_as_bytes() == data
    assert got.download_as_bytes(start=10, end=19) == data[10:20]  # Range: 206


def test_resumable_protocol_308_range_and_its_refusals(env):
    """The session URI, 308 with Range, only whole 256 KiB blocks of a non-final chunk kept, no skipping
    ahead, a wrong X-Goog-Hash refused with no object: the upload protocol as GCS documents it."""
    gcs, _, owner, _ = env
    gcs.add_bucket("raw-bucket", project=P)
    auth = {"Authorization": f"Bearer {owner}"}
    start = httpx.post(f"{gcs.url}/upload/storage/v1/b/raw-bucket/o?uploadType=resumable", headers={
        **auth, "X-Upload-Content-Length": str(600 * KIB)}, json={"name": "raw.bin"})
    assert start.status_code == 200
    session = start.headers["Location"]
    data = b"z" * (600 * KIB)
    # 300 KiB, not a multiple of 256 KiB: only the first 256 KiB are kept
    r = httpx.put(session, content=data[:300 * KIB], headers={"Content-Range": f"bytes 0-{300 * KIB - 1}/*"})
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{256 * KIB - 1}"
    r = httpx.put(session, headers={"Content-Range": f"bytes */{600 * KIB}"})  # status query: no Authorization
    assert r.status_code == 308 and r.headers["Range"] == f"bytes=0-{256 * KIB - 1}"
    r = httpx.put(session, content=data[512 * KIB:], headers={"Content-Range": f"bytes {512 * KIB}-{600 * KIB - 1}/{600 * KIB}"})
    assert r.status_code == 400 and "exceeds already uploaded size" in r.text
    r = httpx.put(session, content=data[256 * KIB:], headers={
        "Content-Range": f"bytes {256 * KIB}-{600 * KIB - 1}/{600 * KIB}", "X-Goog-Hash": "crc32c=AAAAAA=="})
    assert r.status_code == 400 and "doesn't match calculated CRC32C" in r.text
    assert "raw.bin" not in gcs.objects("raw-bucket")
    r = httpx.put(session, content=data[256 * KIB:], headers={
        "Content-Range": f"bytes {256 * KIB}-{600 * KIB - 1}/{600 * KIB}", "X-Goog-Hash": f"crc32c={crc32c(data)}"})
    assert r.status_code == 200 and r.json()["size"] == str(600 * KIB) and r.json()["crc32c"] == crc32c(data)
    r = httpx.put(session, headers={"Content-Range": f"bytes */{600 * KIB}"})  # finished: the object again
    assert r.status_code == 200 and r.json()["generation"] == str(gcs.objects("raw-bucket")["raw.bin"].generation)
    assert httpx.delete(session).status_code == 499 and httpx.put(session, headers={
        "Content-Range": "bytes */*"}).status_code == 404


def test_errors_as_gcs_answers_them(env):
    gcs, _, owner, stranger = env
    c = client(gcs, owner)
    bucket = c.create_bucket("errors-bucket")
    bucket.blob("a.txt").upload_from_string("one")
    with pytest.raises(gexc.NotFound, match="The specified bucket does not exist"):
        c.get_bucket("no-such-bucket")
    with pytest.raises(gexc.NotFound, match="No such object"):
        bucket.blob("missing").download_as_bytes()
    with pytest.raises(gexc.Conflict, match="you already own it"):
        c.create_bucket("errors-bucket")
    with pytest.raises(gexc.PreconditionFailed):  # ifGenerationMatch=0: only if absent
        bucket.blob("a.txt").upload_from_string("two", if_generation_match=0)
    with pytest.raises(gexc.Forbidden, match="does not have storage.objects.list access"):
        list(client(gcs, stranger).list_blobs("errors-bucket"))
    anonymous = httpx.get(f"{gcs.url}/storage/v1/b/errors-bucket/o")  # (the client retries a 401 by refreshing)
    assert anonymous.status_code == 401 and "Anonymous caller does not have" in anonymous.json()["error"]["message"]
    gcs.grant("errors-bucket", "someone@other-project.iam.gserviceaccount.com")  # objectViewer
    assert [b.name for b in client(gcs, stranger).list_blobs("errors-bucket")] == ["a.txt"]
    with pytest.raises(gexc.Forbidden, match="storage.objects.create"):
        client(gcs, stranger).bucket("errors-bucket").blob("b.txt").upload_from_string("no")
    policy = c.bucket("errors-bucket").get_iam_policy(requested_policy_version=3)
    assert policy["roles/storage.objectViewer"] == {"serviceAccount:someone@other-project.iam.gserviceaccount.com"}
    assert f"projectViewer:{P}" in policy["roles/storage.legacyBucketReader"]
    with pytest.raises(gexc.Forbidden, match="storage.buckets.getIamPolicy"):  # an objectViewer cannot read it
        client(gcs, stranger).bucket("errors-bucket").get_iam_policy()


def test_list_prefix_delimiter_and_pages(env):
    gcs, _, owner, _ = env
    bucket = client(gcs, owner).create_bucket("list-bucket")
    for name in ("m/r1/a", "m/r1/b", "m/r2/a", "top"):
        bucket.blob(name).upload_from_string(name)
    it = bucket.list_blobs(prefix="m/", delimiter="/")
    assert [b.name for b in it] == [] and it.prefixes == {"m/r1/", "m/r2/"}
    assert [b.name for b in bucket.list_blobs(prefix="m/r1/")] == ["m/r1/a", "m/r1/b"]
    pages = list(bucket.list_blobs(max_results=None, page_size=2).pages)
    assert [[b.name for b in p] for p in pages] == [["m/r1/a", "m/r1/b"], ["m/r2/a", "top"]]


def test_hub_serves_small_weight_files_by_their_sha256(env, tmp_path):
    """An LFS file: /resolve answers 302 to another host (the Hub's storage) with X-Linked-Etag = its sha256;
    hf_hub_download fetches it; the bytes hash to the tree's lfs.sha256."""
    from huggingface_hub import HfApi, hf_hub_download

    _, hub, _, _ = env
    sha = hub.add_model("sandbox-org/tiny-gcs", params=1_500_000, shard_bytes=2**20)
    tree = {f.path: f for f in HfApi(endpoint=hub.url, token="hf_sandbox_read").list_repo_tree(
        "sandbox-org/tiny-gcs", revision=sha, recursive=True)}
    weights = [p for p, f in tree.items() if f.lfs]
    assert weights == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                       "model-00003-of-00003.safetensors"]
    path = hf_hub_download("sandbox-org/tiny-gcs", weights[1], revision=sha, endpoint=hub.url,
                           token="hf_sandbox_read", cache_dir=tmp_path)
    data = Path(path).read_bytes()
    assert len(data) == tree[weights[1]].size and hashlib.sha256(data).hexdigest() == tree[weights[1]].lfs.sha256
    r = httpx.head(f"{hub.url}/sandbox-org/tiny-gcs/resolve/{sha}/{weights[1]}",
                   headers={"Authorization": "Bearer hf_sandbox_read"})
    assert r.status_code == 302 and r.headers["X-Linked-Etag"] == f'"{tree[weights[1]].lfs.sha256}"'
    assert not r.headers["Location"].startswith(hub.url)  # the storage is another host: the token stays home
