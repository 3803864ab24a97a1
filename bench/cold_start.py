"""Cold wake from 0 GPU nodes, phase by phase: today's path against each fast-start path (``startup:``).

For the seed-001 (Gemma 2 2B-it, vLLM, L4) and seed-004 (Mistral 7B, vLLM, spot L4) specs, each variant
gets its own GPU pool in one sandbox cluster per seed. It is deployed once (that fills what a first start
fills: the HF cache PVC, the image-streaming backend's copy), parked (replicas 0, pool 0 — no GPU node
left), then woken the way ``wake_model`` wakes it, with the product's own tasks: pool to 1 (GKE resize),
replicas to 1, pods Ready, the engine lists the model, the smoke prompts answer. The wake is timed on the
sandbox clock (cloud seconds = real seconds ÷ time scale) and split into phases from what the cluster
says: the resize operation's own start and end (node), the pod's status (scheduled, container started,
Ready), the kubelet's ``Pulled ... in Xs`` event (image), the engine's own log lines (weights: download +
load; CUDA graphs), then the smoke prompts. The total is the sum of the phases; this process's own
polling of the resize operation (magnified by the time scale) is left out, and shown apart as "measured". The floor is the physics the path cannot beat: the node's boot plus the weight
bytes at their source's bandwidth (``sandbox/coldstart.py``, sources in docs/sandbox-contract.md).

    uv run python bench/cold_start.py [--time-scale 0.02] [--json docs/cold-start.json]

The last line reads ``cold wake: <fast> s with fast-start, <today> s today`` for seed 001;
bench/park_week.py takes its wake time W from the JSON this writes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAST_NODES = "fast-start + fast-starting nodes"
SEEDS = {"001": "deployments/gemma2-2b-it-vllm-l4.yaml", "004": "deployments/mistral-7b-vllm-spot.yaml"}
BUCKET = "llm-fleet-weights"
DISK = "vllm-serving-cache"
HDML_CLAIM = "weights-hdml"
IMAGE = {"mirror": "artifact-registry", "streaming": True}
DISK_IMAGE = {**IMAGE, "secondary_boot_disk": DISK}
GCS = {"source": "gcs", "bucket": BUCKET, "loader": "runai_streamer"}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("today", {}),
    ("image: streaming (Artifact Registry)", {"image": IMAGE}),
    ("image: secondary boot disk", {"image": DISK_IMAGE}),
    ("weights: GCS, Run:ai streamer", {"weights": GCS}),
    ("weights: GCS FUSE", {"weights": {"source": "gcs", "bucket": BUCKET, "loader": "gcsfuse"}}),
    ("weights: Hyperdisk ML", {"weights": {"source": "hyperdisk-ml", "volume": HDML_CLAIM}}),
    ("fast-start, CUDA graphs", {"image": DISK_IMAGE, "weights": GCS}),
    ("fast-start", {"image": DISK_IMAGE, "weights": GCS, "cuda_graphs": False}),
    # GKE fast-starting nodes: the pods in Autopilot mode (an Autopilot ComputeClass on the Standard cluster),
    # so no node pool, hence no secondary boot disk: Autopilot streams the image from Artifact Registry
    (FAST_NODES, {"image": IMAGE, "weights": GCS, "cuda_graphs": False, "nodes": "fast-start"}),
]
FAST = FAST_NODES  # the fastest path: its wake is W in bench/park_week.py ("fast_variant" in the JSON)
PHASES = ("node", "schedule", "image", "engine init", "weights", "cuda graphs", "smoke")


def _variant_spec(base: dict[str, Any], i: int, startup: dict[str, Any]) -> Any:
    from manifests.spec import parse_spec

    data = json.loads(json.dumps(base))
    data["name"] = f"{base['name'][:30]}-v{i}"
    data["namespace"] = f"cold-{base['name'][:20]}-{i}"
    data["accelerator"]["pool"] = {**data["accelerator"].get("pool", {}), "name": f"cold-pool-{i}",
                                   "min_nodes": 0, "initial_nodes": 0, "max_nodes": 1}
    data.pop("schedule", None)
    data["service_account"] = data.get("service_account") or "vllm"  # Workload Identity for the bucket
    if startup.get("nodes") == "fast-start":
        # what fast-starting nodes need of the seed (GKE's requirements; startup.check refuses the rest): its
        # own Rapid cluster at 1.33 (Autopilot ComputeClasses in Standard), on-demand L4 only (seed 004's spot
        # capacity is incompatible: its on-demand option alone), no local SSD
        data["cluster"] = {**data["cluster"], "name": f"{data['cluster']['name'][:30]}-fast", "release_channel": "rapid",
                           "version": "1.33"}
        if data.pop("capacity", None):
            data["accelerator"] = {"type": "nvidia-l4", "machine_type": "g2-standard-8",
                                   "pool": {**data["accelerator"]["pool"], "local_ssd_count": 0}}
    if startup:
        data["startup"] = startup
    return parse_spec(data)


class Timer:
    """Cloud seconds since ``start`` on the sandbox clock."""

    def __init__(self, scale: float) -> None:
        self.scale, self.t0 = scale, time.monotonic()

    def __call__(self) -> float:
        return (time.monotonic() - self.t0) / self.scale


def _pod_times(core: Any, ns: str, selector: str, clock: Timer, timeout: float) -> dict[str, float]:
    """Poll the pod until Ready: when it was bound to a node, its container started, and it became Ready."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(ns, label_selector=selector).items
        p = pods[0] if pods else None
        now = clock()
        if p is not None:
            if p.spec.node_name and "scheduled" not in seen:
                seen["scheduled"] = now
            cs = (p.status.container_statuses or [None])[0]
            if cs is not None and cs.state and cs.state.running and "started" not in seen:
                seen["started"] = now
            if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []):
                seen["ready"] = now
                seen.setdefault("scheduled", now)
                seen.setdefault("started", now)
                seen["pod"] = p.metadata.name  # type: ignore[assignment]
                return seen
        time.sleep(0.01)
    raise TimeoutError(f"no Ready pod in {ns} ({seen})")


def _log_seconds(lines: list[str]) -> dict[str, float]:
    """The engine's own account of its start (vLLM's log lines, in cloud seconds)."""
    out = {"download": 0.0, "load": 0.0, "graphs": 0.0}
    for line in lines:
        if m := re.search(r"Time spent downloading weights for \S+: ([\d.]+) seconds", line):
            out["download"] = float(m.group(1))
        elif m := re.search(r"Loading weights took ([\d.]+) seconds", line):
            out["load"] = float(m.group(1))
        elif m := re.search(r"Graph capturing finished in ([\d.]+) secs", line):
            out["graphs"] = float(m.group(1))
    return out


def measure_seed(sb: Any, seed: str, path: str, scale: float, only: str = "") -> list[dict[str, Any]]:
    import yaml
    from kubernetes import client as k8s_client

    from manifests import provision as prov
    from manifests import startup
    from sandbox.disk_images import add_disk_image
    from tasks import artifact_registry, gke
    from tasks.clients import kube_client

    base = yaml.safe_load((ROOT / path).read_text())
    project = f"cold-{seed}-{uuid.uuid4().hex[:6]}"
    base["cluster"]["project"] = project
    specs = [(label, _variant_spec(base, i, st)) for i, (label, st) in enumerate(VARIANTS)
             if not only or label == "today" or only in label]
    c = specs[0][1].cluster
    zone = c.zones[0] if c.zones else f"{c.region}-a"
    # the GCS FUSE variant's cluster body turns the CSI driver on
    gcsfuse = _variant_spec(base, 0, dict(VARIANTS)["weights: GCS FUSE"])
    op = gke.create_cluster.fn(project=project, location=c.location,
                               body=prov.cluster_body(gcsfuse, location=c.location, zones=[zone]))
    gke.wait_operation.fn(project=project, location=c.location, operation=op)
    kubeconfig = gke.get_credentials.fn(project=project, location=c.location, name=c.name)
    core = k8s_client.CoreV1Api(kube_client(kubeconfig))
    add_disk_image(sb.compute, project, DISK, sorted({startup.image_ref(s) for _, s in specs}))
    for repo in {startup.image_repository(s) for _, s in specs} - {None}:  # the image's mirror (mirror_model's)
        artifact_registry.ensure_repository.fn(repo=repo)
    env = {"sb": sb, "seed": seed, "project": project, "location": c.location, "cluster": c.name, "zone": zone,
           "kubeconfig": kubeconfig, "core": core, "scale": scale}
    out = []
    for label, spec in specs:
        if startup.autopilot_mode(spec):  # its own cluster (Rapid, 1.33): no pool, GKE makes the nodes
            out.append(measure_variant(_cluster_env(env, spec), label, spec))
        else:
            out.append(measure_variant(env, label, spec))
    return out


def _cluster_env(env: dict[str, Any], spec: Any) -> dict[str, Any]:
    """A cluster of its own for ``spec`` (the provisioning flow's body), as ``measure_seed`` makes the seed's."""
    from kubernetes import client as k8s_client

    from manifests import provision as prov
    from tasks import gke
    from tasks.clients import kube_client

    c = spec.cluster
    op = gke.create_cluster.fn(project=env["project"], location=c.location,
                               body=prov.cluster_body(spec, location=c.location, zones=[env["zone"]]))
    gke.wait_operation.fn(project=env["project"], location=c.location, operation=op)
    kubeconfig = gke.get_credentials.fn(project=env["project"], location=c.location, name=c.name)
    kube = env["sb"].cluster_kube(c.name, c.location, env["project"])
    kube.autopilot_idle_seconds = 30.0  # the bench's cold wake starts from 0 GPU nodes: idle ones go soon
    return {**env, "cluster": c.name, "kubeconfig": kubeconfig, "core": k8s_client.CoreV1Api(kube_client(kubeconfig))}


def _wake(env: dict[str, Any], spec: Any, clock: Timer) -> dict[str, Any]:
    """What wake_model does, with its tasks: pool to 1, replicas to 1, Ready, the engine answers, smoke."""
    from manifests import names, startup
    from tasks import gke, health, k8s

    where = {"project": env["project"], "location": env["location"], "cluster": env["cluster"],
             "name": spec.option_pool(0)}
    out: dict[str, Any] = {}
    autopilot = startup.autopilot_mode(spec)
    if not autopilot:
        op = gke.set_node_pool_size.fn(**where, nodes=1)
        done = gke.wait_operation.fn(project=env["project"], location=env["location"], operation=op)
        out["node_ready"] = clock()
        # GKE's own record of the resize (startTime .. endTime), not this process's polling of it
        span = datetime.fromisoformat(done["end_time"]) - datetime.fromisoformat(done["start_time"])
        out["node_op"] = span.total_seconds() / env["scale"]
    scaled = clock()
    k8s.scale_deployment.fn(kubeconfig=env["kubeconfig"], namespace=spec.namespace,
                            name=names.deployment(spec, "blue"), replicas=1)
    sel = ",".join(f"{k}={v}" for k, v in names.selector(spec, "blue").items())
    out.update(_pod_times(env["core"], spec.namespace, sel, clock, timeout=600 * env["scale"] + 30))
    if autopilot:
        # Autopilot mode: GKE makes the node for the pod (TriggeredScaleUp .. node Ready) — GKE shows nothing
        # else, so the node phase is the replicas' scale-up to the pod's binding, read on the sandbox clock
        out["node_ready"] = out["scheduled"]
        out["node_op"] = out["scheduled"] - scaled
    smoke = {"kubeconfig": env["kubeconfig"], "namespace": spec.namespace, "service": names.service(spec),
             "engine": spec.engine.kind, "model_id": spec.model.id}
    health.check_engine_ready.fn(**smoke)
    health.smoke_test.fn(**smoke, prompts=list(spec.release.smoke_prompts), max_tokens=spec.release.smoke_max_tokens)
    out["answered"] = clock()
    return out


def _park(env: dict[str, Any], spec: Any) -> None:
    from manifests import names
    from tasks import gke, k8s

    k8s.scale_deployment.fn(kubeconfig=env["kubeconfig"], namespace=spec.namespace,
                            name=names.deployment(spec, "blue"), replicas=0)
    k8s.wait_pods_gone.fn(kubeconfig=env["kubeconfig"], namespace=spec.namespace,
                          selector=names.selector(spec, "blue"), timeout_s=60)
    from manifests import startup

    if startup.autopilot_mode(spec):  # GKE removes the idle Autopilot node by itself: wait until it has
        deadline = time.monotonic() + 60
        while env["core"].list_node(label_selector=f"{names.COMPUTE_CLASS_LABEL}={names.compute_class(spec)}").items:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Autopilot node of {spec.name} is still there")
            time.sleep(0.05)
        return
    op = gke.set_node_pool_size.fn(project=env["project"], location=env["location"], cluster=env["cluster"],
                                   name=spec.option_pool(0), nodes=0)
    gke.wait_operation.fn(project=env["project"], location=env["location"], operation=op)


def measure_variant(env: dict[str, Any], label: str, spec: Any) -> dict[str, Any]:
    from manifests import provision as prov
    from manifests.render import render
    from sandbox import coldstart
    from tasks import gke, k8s

    ns, kubeconfig, core = spec.namespace, env["kubeconfig"], env["core"]
    # capacity options (a ComputeClass): the first option's pool, labelled and tainted for the class
    from manifests import startup

    if not startup.autopilot_mode(spec):  # Autopilot mode (fast-starting nodes): GKE makes the node, no pool
        body = (prov.option_pool_body(spec, 0, zones=[env["zone"]]) if spec.capacity else
                prov.node_pool_body(spec, zone=env["zone"]))
        op = gke.create_node_pool.fn(project=env["project"], location=env["location"], cluster=env["cluster"],
                                     body=body)
        gke.wait_operation.fn(project=env["project"], location=env["location"], operation=op)
    objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": spec.secret.name, "namespace": ns},
             "stringData": {spec.secret.key: "hf_sandbox_token"}}]
    if spec.startup.weights.source == "hyperdisk-ml":  # GKE's documented Hyperdisk ML class, and a filled volume
        from kubernetes import client as k8s_client

        from tasks.clients import kube_client

        k8s_client.StorageV1Api(kube_client(kubeconfig)).create_storage_class({
            "metadata": {"name": "hyperdisk-ml"}, "provisioner": "pd.csi.storage.gke.io",
            "parameters": {"type": "hyperdisk-ml"}, "volumeBindingMode": "WaitForFirstConsumer"})
        objs += [{"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": HDML_CLAIM, "namespace": ns},
                  "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "hyperdisk-ml",
                           "resources": {"requests": {"storage": "100Gi"}}}}]
    for obj in objs + [o for o in render(spec, rbac=False) if o["kind"] != "Namespace"]:
        k8s.apply_object.fn(kubeconfig=kubeconfig, obj=obj)
    _wake(env, spec, Timer(env["scale"]))  # the first deploy: fills the HF cache PVC and the streaming backend
    _park(env, spec)
    t = _wake(env, spec, Timer(env["scale"]))
    pod = str(t.pop("pod"))
    logs = _log_seconds(list(k8s.pod_logs.fn(kubeconfig=kubeconfig, namespace=ns, pod=pod, tail=1000)))
    pulled = [e for e in core.list_namespaced_event(ns, field_selector=f"involvedObject.name={pod}").items
              if e.reason == "Pulled"]
    m = re.search(r" in ([\d.]+)s", pulled[-1].message or "") if pulled else None
    weights = logs["download"] + logs["load"]
    phases = {"node": t["node_op"], "schedule": t["scheduled"] - t["node_ready"],
              "image": t["started"] - t["scheduled"],
              "engine init": max(0.0, t["ready"] - t["started"] - weights - logs["graphs"]),
              "weights": weights, "cuda graphs": logs["graphs"], "smoke": t["answered"] - t["ready"]}
    # the floor: the node's boot and the weight bytes at their source's bandwidth -- sized by the runtime
    # itself (the Hub's parameter count × dtype)
    load = next(s for s in env["sb"].runtime.servers() if s.name == pod).start_plan.load
    node_boot = coldstart.node_boot_s(spec.accelerator.machine, accelerator=spec.accelerator.type, driver="LATEST")
    boots = [e["detail"] for e in env["sb"].gke.autoscaler.events if e["kind"] == "autopilot_node_boot"]
    if startup.autopilot_mode(spec) and boots and boots[-1].startswith("fast"):
        from sandbox.gke.fast_nodes import FAST_START_SPEEDUP

        node_boot /= FAST_START_SPEEDUP  # the node GKE started from its pre-initialized capacity
    floor = node_boot + (load.floor_s if load else 0.0)
    _park(env, spec)
    return {"seed": env["seed"], "variant": label, "spec": spec.name, "model": spec.model.id,
            "total_s": sum(phases.values()), "measured_s": t["answered"], "phases": phases, "pulled": m.group(0).strip() if m else "already present",
            "source": load.source if load else "", "weight_bytes": load.bytes if load else 0,
            "node_boot": boots[-1] if startup.autopilot_mode(spec) and boots else "node pool resize",
            "floor_s": floor, "ratio": sum(phases.values()) / floor}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-scale", type=float, default=0.02)
    parser.add_argument("--seeds", default="001,004")
    parser.add_argument("--json", default=str(ROOT / "docs" / "cold-start.json"))
    parser.add_argument("--only", default="", help="only the variants whose label contains this (and today's)")
    args = parser.parse_args()
    os.environ.setdefault("LLM_FLEET_POLL_INITIAL_S", "0.01")
    os.environ.setdefault("LLM_FLEET_POLL_MAX_S", "0.02")
    from bench._support import start_sandbox

    started = time.perf_counter()
    sb = start_sandbox(args.time_scale)
    results: list[dict[str, Any]] = []
    try:
        for seed in args.seeds.split(","):
            results += measure_seed(sb, seed, SEEDS[seed], args.time_scale, args.only)
    finally:
        sb.stop()
    head = f"{'seed':<5}{'path':<38}" + "".join(f"{p:>12}" for p in PHASES) + f"{'total':>9}{'measured':>10}{'floor':>8}{'÷floor':>8}"
    print(f"cold wake from 0 GPU nodes, cloud seconds (sandbox time scale {args.time_scale})")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['seed']:<5}{r['variant']:<38}" + "".join(f"{r['phases'][p]:>12.1f}" for p in PHASES)
              + f"{r['total_s']:>9.1f}{r['measured_s']:>10.1f}{r['floor_s']:>8.1f}{r['ratio']:>8.2f}")
    print("image: " + "; ".join(f"{r['seed']} {r['variant']}: {r['pulled']}" for r in results
                                if r["variant"] in ("today", FAST)))
    print("weights: " + "; ".join(f"{r['seed']} {r['variant']}: {r['weight_bytes'] / 1e9:.2f} GB from {r['source']}"
                                  for r in results if r["variant"] in ("today", FAST)))
    by = {(r["seed"], r["variant"]): r for r in results}
    for seed in sorted({r["seed"] for r in results}):
        if (seed, FAST) not in by:
            continue
        today, fast = by[(seed, "today")]["total_s"], by[(seed, FAST)]["total_s"]
        print(f"seed {seed}: {fast:.0f} s with fast-start vs {today:.0f} s today ({today / fast:.1f}x faster)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for r in results:
        if r["variant"] == FAST:
            print(f"node: {r['seed']} {FAST}: {r['node_boot']} (sandbox record: GKE shows nothing)")
    Path(args.json).write_text(json.dumps({"time_scale": args.time_scale, "fast_variant": FAST, "results": results},
                                          indent=1) + "\n")
    print(f"written to {args.json}; ran in {time.perf_counter() - started:.0f} s")
    if ("001", FAST) in by:
        print(f"cold wake: {by[('001', FAST)]['total_s']:.0f} s with fast-start, "
              f"{by[('001', 'today')]['total_s']:.0f} s today")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
