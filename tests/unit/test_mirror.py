"""The weights' mirror, pure: what counts as mirrored, where it goes, and the spec fields it needs."""

from __future__ import annotations

import pytest

from manifests.mirror import MirroredObject, SourceFile, check, location, plan, pod_identity, pods_can_read
from manifests.spec import SpecError, parse_spec
from tests.flows.conftest import spec_dict

P = "models/org/m/abc/"
FILES = [SourceFile("config.json", 10, "git-blob:aa"), SourceFile("model.safetensors", 100, "sha256:bb")]


def test_a_file_is_mirrored_only_with_its_size_and_checksum():
    objs = {P + "config.json": MirroredObject(P + "config.json", 10, "git-blob:aa", 1),
            P + "model.safetensors": MirroredObject(P + "model.safetensors", 100, "sha256:bb", 2)}
    assert plan(FILES, objs, prefix=P).copy == ()
    for changed in (MirroredObject(P + "model.safetensors", 99, "sha256:bb", 3),    # another size
                    MirroredObject(P + "model.safetensors", 100, "sha256:cc", 3),   # another file's checksum
                    MirroredObject(P + "model.safetensors", 100, None, 3)):         # not written by a verified copy
        got = plan(FILES, {**objs, changed.name: changed}, prefix=P)
        assert [f.path for f in got.copy] == ["model.safetensors"] and got.bytes_to_copy == 100
    assert [f.path for f in plan(FILES, {}, prefix=P).copy] == ["config.json", "model.safetensors"]


def test_the_mirror_is_where_the_engine_reads():
    spec = parse_spec(spec_dict("gemma2-2b-it-vllm-l4.yaml", service_account="vllm",
                                startup__weights={"source": "gcs", "bucket": "my-weights"}))
    assert location(spec, "c0ffee") == ("my-weights", "models/google/gemma-2-2b-it/c0ffee/")
    check(spec, SpecError)


def test_a_spec_that_reads_the_hub_is_refused_naming_the_field_and_the_fix():
    spec = parse_spec(spec_dict("gemma2-2b-it-vllm-l4.yaml"))
    with pytest.raises(SpecError) as err:
        check(spec, SpecError)
    assert err.value.field == "startup.weights.source"
    assert "set startup.weights: {source: gcs, bucket: <bucket>}" in str(err.value)


def test_the_pods_read_grant_is_found_for_their_google_or_kubernetes_identity():
    gsa = parse_spec(spec_dict("gemma2-2b-it-vllm-l4.yaml", service_account="vllm",
                               gcp_service_account="weights@p.iam.gserviceaccount.com",
                               startup__weights={"source": "gcs", "bucket": "my-weights"}))
    ksa = parse_spec(spec_dict("gemma2-2b-it-vllm-l4.yaml", service_account="vllm",
                               startup__weights={"source": "gcs", "bucket": "my-weights"}))
    viewer = [{"role": "roles/storage.legacyBucketReader", "members": ["projectViewer:p"]},
              {"role": "roles/storage.objectViewer", "members": ["serviceAccount:weights@p.iam.gserviceaccount.com"]}]
    assert pods_can_read(viewer, gsa) and not pods_can_read(viewer, ksa)
    member, fix = pod_identity(ksa)
    assert member.endswith(f"workloadIdentityPools/{ksa.cluster.project}.svc.id.goog/subject/ns/{ksa.namespace}/sa/vllm")
    assert fix == (f"gcloud storage buckets add-iam-policy-binding gs://my-weights --member={member} "
                   "--role=roles/storage.objectViewer")
    granted = [{"role": "roles/storage.objectViewer", "members": [member.replace("PROJECT_NUMBER", "12345")]}]
    assert pods_can_read(granted, ksa)  # the principal as IAM shows it, with the project number
    assert not pods_can_read([{"role": "roles/storage.legacyBucketReader", "members": granted[0]["members"]}], ksa)
