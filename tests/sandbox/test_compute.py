"""The Compute emulator through the real google-cloud-compute REST clients over HTTP."""

from __future__ import annotations

import time

import httpx
import pytest
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type
from google.auth.credentials import AnonymousCredentials

from sandbox.compute import (
    ACCELERATOR_TYPES,
    DEFAULT_GPU_LIMIT,
    DEFAULT_PROJECT_QUOTAS,
    REGIONS,
    ZONE_ACCELERATORS,
    Compute,
    QuotaExceeded,
)
from sandbox.core import Clock, Faults
from tests.lazy import lazy

compute_v1 = lazy("google.cloud.compute_v1")  # ~1.2 s of CPU: in the worker that runs these tests only

P = "sandbox-project"
GPU_LIMIT = DEFAULT_GPU_LIMIT  # per region and GPU metric
ALL_GPUS = DEFAULT_PROJECT_QUOTAS["GPUS_ALL_REGIONS"]


@pytest.fixture
def compute():
    c = Compute(clock=Clock(0.001), faults=Faults(), project=P)
    c.start()
    yield c
    c.stop()


def _opts(c: Compute) -> dict:
    return {"credentials": AnonymousCredentials(), "transport": "rest", "client_options": {"api_endpoint": c.url}}


def _quota(region: compute_v1.Region | compute_v1.Project, metric: str) -> tuple[float, float]:
    for q in region.quotas:
        if q.metric == metric:
            return q.limit, q.usage
    raise AssertionError(f"{metric} not in quotas")


def test_region_quotas_parse_in_real_client(compute):
    region = compute_v1.RegionsClient(**_opts(compute)).get(project=P, region="us-central1", retry=None)
    assert region.name == "us-central1" and region.status == "UP"
    assert [z.rsplit("/", 1)[-1] for z in region.zones] == ["us-central1-a", "us-central1-b", "us-central1-c",
                                                            "us-central1-f"]
    for metric in ("NVIDIA_L4_GPUS", "PREEMPTIBLE_NVIDIA_L4_GPUS", "NVIDIA_T4_GPUS", "PREEMPTIBLE_NVIDIA_T4_GPUS",
                   "NVIDIA_A100_GPUS", "NVIDIA_A100_80GB_GPUS", "NVIDIA_H100_GPUS", "CPUS"):
        limit, usage = _quota(region, metric)
        assert limit > 0 and usage == 0
    assert _quota(region, "NVIDIA_L4_GPUS") == (GPU_LIMIT, 0.0)
    assert _quota(region, "PREEMPTIBLE_NVIDIA_L4_GPUS") == (GPU_LIMIT, 0.0)

    names = [r.name for r in compute_v1.RegionsClient(**_opts(compute)).list(project=P, retry=None)]
    assert names == list(REGIONS)


def test_project_info_has_gpus_all_regions(compute):
    project = compute_v1.ProjectsClient(**_opts(compute)).get(project=P, retry=None)
    assert project.name == P
    assert _quota(project, "GPUS_ALL_REGIONS") == (ALL_GPUS, 0.0)
    assert project.default_service_account.endswith("-compute@developer.gserviceaccount.com")


def test_reserve_and_release_move_regional_and_global_usage(compute):
    regions = compute_v1.RegionsClient(**_opts(compute))
    projects = compute_v1.ProjectsClient(**_opts(compute))
    compute.reserve("us-central1", "PREEMPTIBLE_NVIDIA_L4_GPUS", 3)
    compute.reserve_many("europe-west4", {"NVIDIA_L4_GPUS": 2, "CPUS": 16})
    assert _quota(regions.get(project=P, region="us-central1", retry=None), "PREEMPTIBLE_NVIDIA_L4_GPUS") == (GPU_LIMIT, 3)
    assert _quota(regions.get(project=P, region="europe-west4", retry=None), "CPUS")[1] == 16
    project = projects.get(project=P, retry=None)
    assert _quota(project, "GPUS_ALL_REGIONS") == (ALL_GPUS, 5)
    assert _quota(project, "CPUS_ALL_REGIONS")[1] == 16

    compute.release("us-central1", "PREEMPTIBLE_NVIDIA_L4_GPUS", 3)
    compute.release_many("europe-west4", {"NVIDIA_L4_GPUS": 2, "CPUS": 16})
    assert compute.quota_used() == {"project": {}, "regions": {}}
    assert _quota(projects.get(project=P, retry=None), "GPUS_ALL_REGIONS") == (ALL_GPUS, 0)


def test_quota_exceeded_is_all_or_nothing(compute):
    compute.set_quota("us-central1", "NVIDIA_L4_GPUS", 2)
    compute.reserve("us-central1", "NVIDIA_L4_GPUS", 2)
    with pytest.raises(QuotaExceeded) as err:
        compute.reserve_many("us-central1", {"CPUS": 8, "NVIDIA_L4_GPUS": 1})
    assert err.value.metric == "NVIDIA_L4_GPUS" and err.value.short == 1
    assert "Insufficient regional quota" in str(err.value) and '"NVIDIA_L4_GPUS"' in str(err.value)
    assert compute.quota("us-central1", "CPUS")["usage"] == 0  # nothing of the failed request was taken

    # the project-wide limit binds too, across regions
    compute.set_quota(None, "GPUS_ALL_REGIONS", 3)
    with pytest.raises(QuotaExceeded) as err:
        compute.reserve("europe-west1", "NVIDIA_T4_GPUS", 2)
    assert err.value.metric == "GPUS_ALL_REGIONS" and err.value.region is None
    compute.reserve("europe-west1", "NVIDIA_T4_GPUS", 1)
    project = compute_v1.ProjectsClient(**_opts(compute)).get(project=P, retry=None)
    assert _quota(project, "GPUS_ALL_REGIONS") == (3, 3)


def test_accelerator_catalogue_has_realistic_gaps(compute):
    types = compute_v1.AcceleratorTypesClient(**_opts(compute))
    in_f = [a.name for a in types.list(project=P, zone="us-central1-f", retry=None)]
    assert "nvidia-tesla-t4" in in_f and "nvidia-l4" not in in_f
    in_a = {a.name: a for a in types.list(project=P, zone="us-central1-a", retry=None)}
    assert {"nvidia-l4", "nvidia-tesla-t4", "nvidia-tesla-a100", "nvidia-a100-80gb", "nvidia-h100-80gb"} <= set(in_a)
    assert in_a["nvidia-l4"].maximum_cards_per_instance == 8
    assert in_a["nvidia-l4"].zone.endswith("/zones/us-central1-a")
    l4 = types.get(project=P, zone="europe-west1-b", accelerator_type="nvidia-l4-vws", retry=None)
    assert l4.description == "NVIDIA L4 Virtual Workstation"
    with pytest.raises(gexc.NotFound):
        types.get(project=P, zone="europe-west1-d", accelerator_type="nvidia-l4", retry=None)

    offering: dict[str, list[str]] = {}
    for scope, scoped in types.aggregated_list(request={"project": P}, retry=None):
        for acc in scoped.accelerator_types:
            offering.setdefault(acc.name, []).append(scope.removeprefix("zones/"))
    assert sorted(offering["nvidia-l4"]) == sorted(z for z, accs in ZONE_ACCELERATORS.items() if "nvidia-l4" in accs)
    assert set(offering) == set(ACCELERATOR_TYPES)
    # a server-side filter on the name is honoured
    filtered = {scoped_acc.name for _, scoped in types.aggregated_list(
        request={"project": P, "filter": "name = nvidia-h100-80gb"}, retry=None) for scoped_acc in
        scoped.accelerator_types}
    assert filtered == {"nvidia-h100-80gb"}


def test_zones_and_not_found_error_shape(compute):
    zones = compute_v1.ZonesClient(**_opts(compute))
    zone = zones.get(project=P, zone="europe-west4-b", retry=None)
    assert zone.region.endswith("/regions/europe-west4")
    assert len(list(zones.list(project=P, retry=None))) == len(ZONE_ACCELERATORS)
    with pytest.raises(gexc.NotFound) as err:
        compute_v1.RegionsClient(**_opts(compute)).get(project=P, region="mars-north1", retry=None)
    assert "projects/sandbox-project/regions/mars-north1" in err.value.message
    body = httpx.get(f"{compute.url}/compute/v1/projects/{P}/regions/mars-north1").json()
    assert body["error"]["code"] == 404 and body["error"]["errors"][0]["reason"] == "notFound"


def test_stockouts_and_offers(compute):
    assert compute.offers("us-central1-a", "nvidia-l4") and not compute.offers("us-central1-f", "nvidia-l4")
    compute.set_stockout("us-central1-a", "nvidia-l4")
    assert compute.stocked_out("us-central1-a", "nvidia-l4")
    assert not compute.stocked_out("us-central1-a", "nvidia-tesla-t4")
    assert not compute.stocked_out("us-central1-a", None)
    compute.set_stockout("us-central1-b", None)  # every GPU type, plain VMs still start
    assert compute.stocked_out("us-central1-b", "nvidia-tesla-t4") and not compute.stocked_out("us-central1-b")
    compute.set_stockout("us-central1-c", "*")  # nothing starts
    assert compute.stocked_out("us-central1-c") and compute.stocked_out("us-central1-c", "nvidia-l4")
    compute.set_stockout("us-central1-a", "nvidia-l4", on=False)
    compute.set_stockout("us-central1-c", "*", on=False)
    assert not compute.stocked_out("us-central1-a", "nvidia-l4") and not compute.stocked_out("us-central1-c")
    assert compute.snapshot()["stockouts"] == [{"zone": "us-central1-b", "accelerator": None}]
    with pytest.raises(ValueError):
        compute.set_stockout("us-central1-z", "nvidia-l4")


def test_faults_status_count_and_latency(compute):
    regions = compute_v1.RegionsClient(**_opts(compute))
    rule = compute.faults.add(service="compute", method="GET", path=r"/regions/", status=429, count=2)
    with pytest.raises(gexc.TooManyRequests):
        regions.get(project=P, region="us-central1", retry=None)
    retry = Retry(predicate=if_exception_type(gexc.TooManyRequests), initial=0.01, maximum=0.02, timeout=5)
    assert regions.get(project=P, region="us-central1", retry=retry).name == "us-central1"
    assert rule.hits == 2

    compute.faults.add(service="compute", path=r"/projects/sandbox-project$", latency=0.3)
    t0 = time.monotonic()
    compute_v1.ProjectsClient(**_opts(compute)).get(project=P, retry=None)
    assert time.monotonic() - t0 >= 0.3


def test_hang_fault_times_out_the_client(compute):
    compute.faults.add(service="compute", path=r"/zones$", hang=True)
    with pytest.raises((gexc.GoogleAPICallError, httpx.HTTPError, Exception)) as err:
        compute_v1.ZonesClient(**_opts(compute)).list(project=P, retry=None, timeout=0.3)
    assert "timed out" in str(err.value).lower() or "timeout" in type(err.value).__name__.lower()
    compute.faults.stop.set()  # release the hung handler


def test_every_reply_parses_strictly_as_compute_v1(compute):
    """Replies are hand-built JSON: each must be exactly what the compute_v1 messages define."""
    compute.reserve("us-central1", "NVIDIA_L4_GPUS", 1)
    compute.set_mig("us-central1-a", "gke-c-np-1234abcd-grp", instances=["gke-c-np-1234abcd-x1y2"],
                    base_instance_name="gke-c-np-1234abcd")
    base = f"{compute.url}/compute/v1/projects/{P}"
    cases = {
        "": compute_v1.Project, "/regions/us-central1": compute_v1.Region, "/regions": compute_v1.RegionList,
        "/zones/us-central1-a": compute_v1.Zone, "/zones": compute_v1.ZoneList,
        "/zones/us-central1-a/acceleratorTypes": compute_v1.AcceleratorTypeList,
        "/zones/us-central1-a/acceleratorTypes/nvidia-l4": compute_v1.AcceleratorType,
        "/aggregated/acceleratorTypes": compute_v1.AcceleratorTypeAggregatedList,
        "/zones/us-central1-a/instanceGroupManagers/gke-c-np-1234abcd-grp": compute_v1.InstanceGroupManager,
        "/zones/us-central1-a/instanceGroupManagers": compute_v1.InstanceGroupManagerList,
        "/zones/us-central1-a/instances": compute_v1.InstanceList,
        "/zones/us-central1-a/instances/gke-c-np-1234abcd-x1y2": compute_v1.Instance,
        "/zones/us-central1-a/operations": compute_v1.OperationList,
        "/aggregated/operations": compute_v1.OperationAggregatedList,
        "/aggregated/addresses": compute_v1.AddressAggregatedList,
    }
    for path, cls in cases.items():
        resp = httpx.get(base + path)
        assert resp.status_code == 200, path
        msg = cls.from_json(resp.text, ignore_unknown_fields=False)
        assert cls.to_dict(msg), path
    mig = compute_v1.InstanceGroupManager.from_json(httpx.get(base + "/zones/us-central1-a/instanceGroupManagers/"
                                                              "gke-c-np-1234abcd-grp").text)
    assert mig.target_size == 1 and mig.status.is_stable


def test_vm_operations_time_each_node(compute):
    """A MIG resize leaves one operation per VM (``compute.instances.insert`` / ``.delete``) with millisecond
    times, and each live instance its own creationTimestamp: a node's life, read back with compute_v1."""
    from manifests.usage import ts

    t0 = time.time()
    compute.set_mig("us-central1-a", "gke-c-gpu-1234abcd-grp", instances=["gke-c-gpu-1234abcd-a1"],
                    base_instance_name="gke-c-gpu-1234abcd")
    time.sleep(0.05)
    compute.set_mig("us-central1-a", "gke-c-gpu-1234abcd-grp", instances=["gke-c-gpu-1234abcd-b2"],
                    base_instance_name="gke-c-gpu-1234abcd")
    t1 = time.time()
    pages = compute_v1.GlobalOperationsClient(**_opts(compute)).aggregated_list(project=P, retry=None)
    ops = [o for scope, listed in pages for o in listed.operations if scope == "zones/us-central1-a"]
    seen = [(o.operation_type, o.target_link.rsplit("/", 1)[1]) for o in ops]
    assert seen == [("compute.instances.insert", "gke-c-gpu-1234abcd-a1"),
                    ("compute.instances.insert", "gke-c-gpu-1234abcd-b2"),
                    ("compute.instances.delete", "gke-c-gpu-1234abcd-a1")]
    assert all(o.status == compute_v1.Operation.Status.DONE and t0 - 0.001 <= ts(o.end_time) <= t1 for o in ops)
    life = ts(ops[2].end_time) - ts(ops[0].end_time)
    assert 0.04 <= life < t1 - t0 + 0.01  # milliseconds, not whole seconds
    (vm,) = compute_v1.InstancesClient(**_opts(compute)).list(project=P, zone="us-central1-a", retry=None)
    assert vm.name == "gke-c-gpu-1234abcd-b2" and ts(vm.creation_timestamp) == ts(ops[1].end_time)
    zonal = compute_v1.ZoneOperationsClient(**_opts(compute)).list(project=P, zone="us-central1-a", retry=None)
    assert [o.name for o in zonal] == [o.name for o in ops]
