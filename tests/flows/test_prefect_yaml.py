"""A fresh `prefect server start` of this module's own, in the production shape (PostgreSQL): a product flow
runs through it into PostgreSQL, and `prefect --no-prompt deploy --all` creates every flow's deployment
with its schedules, triggers, concurrency and parameter forms, read back over the Prefect API.

PostgreSQL is Debian's `postgresql` package, started as a non-root user under a temp dir (installed with
apt first when it is missing and apt is there). Only without apt does the server use SQLite, and the
PostgreSQL test is skipped, saying why. (One server for both: each start costs ~9 CPU-s on this machine.)"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from deploy.gke_variant import IMAGE_DIR, gke_variant
from tests.flows.harness import NO_BLOCK_REGISTRATION
from tests.flows.server_support import ROOT, PostgresUnavailable, postgres_server, prefect_cli, prefect_server

# A fresh server and `prefect deploy` of every flow: minutes on a loaded 2-core machine.
pytestmark = pytest.mark.timeout(600)

PREFECT_YAML = yaml.safe_load((ROOT / "prefect.yaml").read_text())


def flows_in_repo() -> dict[str, str]:
    """Every `@flow(name=...)` under flows/: flow name -> entrypoint."""
    out = {}
    for path in sorted((ROOT / "flows").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "flow":
                    name = next((k.value.value for k in dec.keywords if k.arg == "name"), node.name)
                    out[name] = f"flows/{path.name}:{node.name}"
    return out


def test_every_flow_in_the_repo_is_a_deployment():
    local = {d["entrypoint"] for d in PREFECT_YAML["deployments"]}
    missing = {n: e for n, e in flows_in_repo().items() if e not in local}
    assert not missing, f"flows without a deployment in prefect.yaml: {missing}"
    for d in PREFECT_YAML["deployments"]:
        assert (ROOT / d["entrypoint"].split(":")[0]).exists(), d["entrypoint"]
        assert d.get("description") and "llm-fleet" in d.get("tags", []), d["entrypoint"]
        # named for what it does or when it runs (13 rows titled "default" told nobody anything)
        assert d["name"] != "default", d["entrypoint"]
        assert all(t.get("name") and t.get("description") for t in d.get("triggers") or []), d["entrypoint"]
    keys = [f"{d['entrypoint'].split(':')[1]}/{d['name']}" for d in PREFECT_YAML["deployments"]]
    assert len(set(keys)) == len(keys)


def test_pull_step_has_no_machine_specific_path():
    text = (ROOT / "prefect.yaml").read_text()
    assert str(ROOT) not in text and "$LLM_FLEET_HOME" not in text.split("\npull:")[1].split("\n\n")[0]


def _create_pool(api: str, name: str, type_: str, *, template: Path | None = None) -> None:
    """What `prefect work-pool create NAME --type T [--base-job-template F]` sends, without the CLI process
    (each start of it costs seconds of CPU): the process worker's default job template, or the file's. (Not
    Prefect's lookup by type: it imports every installed collection first, 3 CPU-s for prefect_gcp.)"""
    import json

    from prefect.workers.process import ProcessWorker

    assert template or type_ == ProcessWorker.type, f"give the job template of a {type_!r} pool"
    body = json.loads(template.read_text()) if template else ProcessWorker.get_default_base_job_template()
    resp = httpx.post(f"{api}/work_pools/", json={"name": name, "type": type_, "base_job_template": body}, timeout=30)
    assert resp.status_code == 201, resp.text


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """The module's server: (api, env for CLIs, its PREFECT_HOME, the PostgreSQL URL or None)."""
    with contextlib.ExitStack() as stack:
        postgres, why = None, None
        try:
            postgres = stack.enter_context(postgres_server())
        except PostgresUnavailable as exc:
            why = str(exc)
        # on PostgreSQL: `deploy --all` writes 15 deployments, 10 s there, 20 s on SQLite
        home = tmp_path_factory.mktemp("prefect-home")
        db = {"PREFECT_API_DATABASE_CONNECTION_URL": postgres} if postgres else {}
        # No block types registered at its start, as the flow tests' servers (harness.py): that imports every
        # installed collection first, prefect_gcp and google.cloud.aiplatform (5 of its CPU-s), and no test
        # here reads a block type.
        api, env = stack.enter_context(prefect_server(home, **db, **NO_BLOCK_REGISTRATION))
        yield SimpleNamespace(api=api, env=env, home=home, postgres=postgres, why=why)


def test_the_server_on_postgres_runs_a_product_flow_into_postgres(own_server):
    if own_server.postgres is None:
        pytest.skip(own_server.why)
    api, postgres = own_server.api, own_server.postgres
    # The server migrated its schema into PostgreSQL (not a SQLite file in PREFECT_HOME).
    assert not list(own_server.home.glob("*.db"))
    code = ("from flows.deploy_fleet import deploy_fleet\n"
            "r = deploy_fleet(fleet='deployments/fleets/demo.yaml', dry_run=True)\n"
            "assert len(r['models']) == 3, r\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=own_server.env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    only_fleet = {"flows": {"name": {"any_": ["deploy_fleet"]}}, "limit": 10}
    with httpx.Client(base_url=api, timeout=30) as http:
        runs = http.post("/flow_runs/filter", json=only_fleet).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
        arts = http.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["deploy-fleet-plan"]}}}).json()
        assert arts and arts[0]["flow_run_id"] == runs[0]["id"]

    # ...and the run is in PostgreSQL itself.
    import asyncpg

    async def completed() -> list[str]:
        conn = await asyncpg.connect(postgres.replace("postgresql+asyncpg", "postgresql"))
        try:
            return [str(r["id"]) for r in await conn.fetch("select id from flow_run where state_type = 'COMPLETED'")]
        finally:
            await conn.close()

    deadline = time.monotonic() + 10
    while (ids := asyncio.run(completed())) != [runs[0]["id"]] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ids == [runs[0]["id"]]


@pytest.fixture(scope="module")
def deployed(own_server, tmp_path_factory):
    # A copy of the project in a fresh directory: the pull step must point at *that* clone.
    clone = tmp_path_factory.mktemp("clone") / "llm-fleet"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", ".ruff_cache",
                                                               ".pytest_cache", "node_modules"))
    api, env = own_server.api, own_server.env
    _create_pool(api, "local", "process")
    prefect_cli("--no-prompt", "deploy", "--all", env=env, cwd=clone)
    # The production variant: same deployments on a kubernetes pool with the repo's job template.
    # Two of its deployments are enough to prove the template and the variant (each deploy costs seconds).
    some = {**PREFECT_YAML, "deployments": [d for d in PREFECT_YAML["deployments"]
                                            if d["entrypoint"].endswith((":check_fleet", ":deploy_model"))]}
    (clone / "deploy" / "prefect.gke.yaml").write_text(yaml.safe_dump(gke_variant(some, pool="gke",
                                                                                  image="flows:test")))
    _create_pool(api, "gke", "kubernetes", template=ROOT / "deploy" / "gke-job-template.json")
    prefect_cli("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.gke.yaml", env=env, cwd=clone)
    with httpx.Client(base_url=api, timeout=30) as http:
        deployments = http.post("/deployments/filter", json={"limit": 200}).json()
        flows = {f["id"]: f["name"] for f in http.post("/flows/filter", json={"limit": 200}).json()}
        automations = http.post("/automations/filter", json={"limit": 200}).json()
        pool = http.get("/work_pools/gke").json()
    local = {f"{flows[d['flow_id']]}/{d['name']}": d for d in deployments if d["work_pool_name"] == "local"}
    gke = {f"{flows[d['flow_id']]}/{d['name']}": d for d in deployments if d["work_pool_name"] == "gke"}
    local_ids = {d["id"] for d in local.values()}
    return {"deployments": local, "gke": gke, "gke_pool": pool, "clone": clone,
            "automations": [a for a in automations if any(x.get("deployment_id") in local_ids
                                                          for x in a["actions"])]}


def _declared():
    return {f"{d['entrypoint'].split(':')[1]}/{d['name']}": d for d in PREFECT_YAML["deployments"]}


def test_deploy_all_creates_every_deployment(deployed):
    names = {e.split(":")[1] for e in flows_in_repo().values()}
    got = deployed["deployments"]
    assert {k.split("/")[0] for k in got} >= names
    for key, want in _declared().items():
        d = got[key]
        assert d["work_pool_name"] == "local"
        assert d["description"] == want["description"].strip()
        assert set(want["tags"]) <= set(d["tags"])
        # The pull step points at the clone deploy ran in, not at this checkout.
        step = d["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert Path(step["directory"]) == deployed["clone"]
        for param, value in (want.get("parameters") or {}).items():
            assert d["parameters"][param] == value


def test_schedules_triggers_and_concurrency_read_back(deployed):
    got = deployed["deployments"]
    by_deployment: dict[str, list[dict]] = {}
    for a in deployed["automations"]:
        for action in a["actions"]:
            if action.get("deployment_id"):
                by_deployment.setdefault(action["deployment_id"], []).append(a)
    for key, want in _declared().items():
        d = got[key]
        crons = sorted((s["schedule"].get("cron") or s["schedule"].get("interval")) for s in d["schedules"])
        assert crons == sorted((s.get("cron") or s.get("interval")) for s in want.get("schedules", [])), key
        if want.get("schedules"):
            assert all(s["active"] for s in d["schedules"])
        triggers = by_deployment.get(d["id"], [])
        assert len(triggers) == len(want.get("triggers", [])), key
        for auto, trig in zip(triggers, want.get("triggers", []), strict=True):
            assert auto["name"] == trig["name"] and auto["description"] == trig["description"]
            assert auto["trigger"]["expect"] == trig["expect"]
            assert auto["actions"][0]["type"] == "run-deployment"
            assert auto["actions"][0]["parameters"] == trig.get("parameters", {})
        limit = want.get("concurrency_limit")
        # Prefect 3.8 keeps a deployment's limit as a global concurrency limit of its own.
        if limit:
            assert (d["global_concurrency_limit"] or {}).get("limit") == limit["limit"], key
            assert d["concurrency_options"]["collision_strategy"] == limit["collision_strategy"], key
        else:
            assert d.get("global_concurrency_limit") is None, key


def test_scheduled_flows_have_schedules(deployed):
    scheduled = {"check_fleet", "gpu_report", "park_idle", "watch_revisions", "migrate_back"}
    for key, d in deployed["deployments"].items():
        if key.split("/")[0] in scheduled:
            assert d["schedules"], f"{key} has no schedule"


def test_parameters_show_as_forms(deployed):
    """The spec picker is an enum of the bundled specs; dry_run is a boolean; every flow takes a spec."""
    from manifests.fleet import bundled_specs

    for key, d in deployed["deployments"].items():
        props = d["parameter_openapi_schema"]["properties"]
        if "dry_run" in props:
            assert props["dry_run"]["type"] == "boolean", key
        spec = props.get("spec") or props.get("specs")
        if key.split("/")[0] in {"teardown", "check_fleet", "gpu_report"}:
            text = str(spec) + str(d["parameter_openapi_schema"].get("definitions", {}))
            assert all(p in text for p in bundled_specs()), f"{key}: no spec picker: {spec}"
        if key.split("/")[0] == "deploy_fleet":
            assert "deployments/fleets/demo.yaml" in str(props["fleet"]), props["fleet"]
    # what the server keeps is what the UI's form reads: every spec field's help survives `prefect deploy`
    from manifests.fleet import deployment_name
    from tests.unit.test_operator_names import _fields

    form = deployed["deployments"][deployment_name("deploy_model")]["parameter_openapi_schema"]["properties"]["spec"]
    fields = dict(_fields(form["anyOf"][2], "spec"))
    assert len(fields) > 150 and not [p for p, f in fields.items() if not f.get("description")]


def test_kubernetes_variant_runs_the_same_deployments_in_the_image(deployed):
    assert deployed["gke_pool"]["type"] == "kubernetes"
    template = deployed["gke_pool"]["base_job_template"]
    assert template["variables"]["properties"]["service_account_name"]["default"] == "llm-fleet-operator"
    assert set(deployed["gke"]) == {"check_fleet/every-5-min-gke", "deploy_model/deploy-gke"}
    for key, d in deployed["gke"].items():
        key = key.removesuffix("-gke")
        assert d["job_variables"]["image"] == "flows:test"
        assert d["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == IMAGE_DIR
        assert [s["schedule"] for s in d["schedules"]] == [s["schedule"] for s in deployed["deployments"][key]["schedules"]]
