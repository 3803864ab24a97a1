"""What an operator reads in the Prefect UI: deployments and automations named for what they do, a
description on every parameter (the flows' docstring Args), one tab per kind of value (no "str | str",
no tab opening on "None")."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def _flow(entrypoint: str):
    module, name = entrypoint.split(":")
    return getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)


def _tabs(prop: dict) -> list[str]:
    """The labels the UI's anyOf tabs show (SchemaFormPropertyAnyOf: title ?? alias ?? format ?? type)."""
    return [o.get("title") or o.get("format") or o.get("type") or "" for o in prop.get("anyOf") or []]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["entrypoint"].split(":")[1])
def test_every_parameter_is_described_and_typed_once(deployment):
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(_flow(deployment["entrypoint"])).model_dump()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), f"{deployment['entrypoint']}: {name} has no description (docstring Args)"
        for p in [prop, prop.get("items") or {}]:
            tabs = _tabs(p)
            assert len(tabs) == len(set(tabs)), f"{name}: tabs {tabs}"
            assert "null" not in tabs, f"{name}: a tab that opens on None ({tabs})"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["entrypoint"].split(":")[1])
def test_every_run_form_can_be_submitted_as_it_opens(deployment):
    """The UI's run form opens with each parameter's schema default (the deployment's own parameters over
    them) and checks it against the schema before it submits, as the server does (enforce_parameter_schema).
    As it opens it must pass: a text field whose default was null could not be submitted ("None is not of type
    'string'": deploy_model/deploy's revision, gpu_report/daily's fleet/day/start/end/prices — seen in the
    browser), and an empty field reaches the flow as None."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    flow = _flow(deployment["entrypoint"])
    schema = parameter_schema(flow).model_dump()
    opened = {name: prop["default"] for name, prop in schema["properties"].items() if "default" in prop}
    opened.update(deployment.get("parameters") or {})
    errors = validate(opened, schema)
    assert errors == [], [e.message for e in errors]
    empty = {name for name, value in opened.items() if value == ""}
    coerced = flow.validate_parameters(opened)
    assert all(coerced[name] is None for name in empty), coerced


def test_revision_is_a_plain_optional_string_on_deploy_and_release():
    from prefect.utilities.callables import parameter_schema

    from flows.deploy_model import deploy_model
    from flows.release_model import release_model

    for flow in (deploy_model, release_model):
        rev = parameter_schema(flow).model_dump()["properties"]["revision"]
        assert rev["type"] == "string" and "anyOf" not in rev and rev["default"] == ""  # an empty field ...
        assert flow.validate_parameters({"spec": "x.yaml", "revision": ""})["revision"] is None  # ... means None
    spec = parameter_schema(deploy_model).model_dump()["properties"]["spec"]
    assert _tabs(spec) == ["bundled spec", "spec file", "spec (mapping)"]


def test_names_are_derived_from_prefect_yaml():
    from manifests.fleet import deployment_name
    from manifests.park import desired_schedules
    from manifests.spec import load_spec

    assert deployment_name("park_model") == "park_model/park"
    assert deployment_name("release_model") == "release_model/blue-green"
    spec = load_spec(ROOT / "deployments/paligemma2-tgi-autopilot.yaml")
    if spec.schedule and spec.schedule.park:
        assert {e.deployment for e in desired_schedules(spec, spec_ref="p.yaml", wake_seconds=[])} == {
            "park_model/park", "wake_model/wake-on-request"}


def _variants():
    """Every bundled spec as a mapping, and with the spec's shorthands and text durations."""
    for path in sorted((ROOT / "deployments").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        yield path.name, data
        short = dict(data, model=data["model"]["id"] if isinstance(data["model"], dict) else data["model"],
                     load_timeout="40m", release=dict(data.get("release") or {}, promotion_timeout="1.5h"))
        acc = data.get("accelerator") or {}
        if "capacity" not in data and (isinstance(acc, str) or set(acc) <= {"type"}):
            short["accelerator"] = acc if isinstance(acc, str) else acc.get("type", "nvidia-l4")
        yield path.name + " (shorthands)", short


def test_the_spec_mapping_tab_is_a_form_of_the_spec_that_accepts_what_the_spec_accepts():
    """The UI's "spec (mapping)" tab is the spec's own fields (an editor with enums, defaults, help), not a
    bare JSON object; the Prefect server checks a deployment run's mapping against it (enforce_parameter_schema),
    so every spec the product accepts must pass it, and a typo or a bad value is refused naming the field."""
    import json

    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.deploy_model import deploy_model
    from manifests.spec import parse_spec

    schema = parameter_schema(deploy_model).model_dump()
    mapping = schema["properties"]["spec"]["anyOf"][2]
    assert mapping["type"] == "object" and mapping["additionalProperties"] is False and "$ref" not in json.dumps(mapping)
    assert {"name", "model", "engine", "accelerator", "release", "hold"} <= set(mapping["properties"])
    timeout = mapping["properties"]["release"]["properties"]["promotion_timeout"]
    assert timeout["type"] == "string" and "5m" in timeout["description"]
    assert mapping["properties"]["engine"]["anyOf"][1]["properties"]["kind"]["enum"]  # a dropdown, not free text
    for name, spec in _variants():
        parse_spec(spec)  # the product accepts it ...
        assert validate({"spec": spec}, schema) == [], name  # ... and so does the form and the server
    good = yaml.safe_load((ROOT / "deployments/gemma2-2b-it-vllm-l4.yaml").read_text())
    for bad, where in ((dict(good, replica=2), "replica"), (dict(good, engine={"kind": "vllmx"}), "vllmx")):
        errors = validate({"spec": bad}, schema)
        assert errors and any(where in e.message for e in errors), [e.message for e in errors]


def test_the_gpu_report_window_is_picked_as_dates_and_times():
    """gpu_report's window shows as the UI's date and date-time pickers (was a raw epoch: start=1796519265.13)."""
    from prefect.utilities.callables import parameter_schema

    from flows.gpu_report import gpu_report

    props = parameter_schema(gpu_report).model_dump()["properties"]
    # a picker, or "not set" (an empty picker is no valid date, so it cannot be the form's default)
    assert _tabs(props["day"]) == ["date", "not set"] and props["day"]["anyOf"][0]["format"] == "date"
    for name in ("start", "end"):
        assert _tabs(props[name]) == ["date and time", "not set"]
        assert props[name]["anyOf"][0] == {"type": "string", "format": "date-time", "title": "date and time"}


def test_a_dry_run_teardown_says_what_it_would_delete():
    """teardown/remove is a dry run by default (prefect.yaml), and says so where its result is read: its
    description, its steps' titles and its summary ('would delete: …', never a bare 'delete: …')."""
    from targets.gke.teardown_steps import Item, _summary

    remove = next(d for d in DEPLOYMENTS if d["entrypoint"].endswith(":teardown"))
    assert remove["parameters"]["dry_run"] is True and "dry run by default" in remove["description"]
    assert "dry_run false" in remove["description"]
    items = [Item("Deployment", "m-blue", "ns", "delete"), Item("Pod", "m-blue-x", "ns", "delete"),
             Item("Secret", "hf-secret", "ns", "hand over"), Item("Role", "llm-fleet-operator", "ns", "keep")]
    assert _summary(items, dry_run=True) == ("would delete: Deployment/m-blue; would hand over: Secret/hf-secret; "
                                             "would keep: Role/llm-fleet-operator")
    assert _summary(items).startswith("delete: Deployment/m-blue; hand over: ")


def _fields(node: dict, path: str):
    """Every property of a JSON schema, at any depth (nested objects, list items, anyOf/allOf tabs)."""
    for name, prop in (node.get("properties") or {}).items():
        yield f"{path}.{name}", prop
        yield from _fields(prop, f"{path}.{name}")
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in node.get(key) or []:
            yield from _fields(sub, path)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _fields(node[key], f"{path}[]")


def test_every_field_of_the_spec_form_has_help():
    """The "spec (mapping)" tab shows each spec field's description as its help text: every field of every
    spec model has one (a field docstring or Field(description=...)), including nested, optional and list
    fields, and a duration's help keeps the accepted forms (fails before: 152 of 188 fields had none)."""
    from prefect.utilities.callables import parameter_schema

    from flows.deploy_model import deploy_model

    form = parameter_schema(deploy_model).model_dump()["properties"]["spec"]["anyOf"][2]
    fields = dict(_fields(form, "spec"))
    assert len(fields) > 150 and "spec.release.pre_promotion.max_latency_ratio" in fields
    missing = [path for path, prop in fields.items() if not (prop.get("description") or "").strip()]
    assert missing == [], f"{len(missing)} spec fields show no help in the UI form: {missing}"
    timeout = fields["spec.release.promotion_timeout"]["description"]
    assert "rolls back" in timeout and "5m" in timeout
    assert "vllm" in fields["spec.engine"]["description"]  # a shorthand field's help sits above its tabs
    # each field is titled by its name, not by its model's class ("Engine", not "EngineSpec")
    from manifests import spec as spec_module

    classes = {n for n, v in vars(spec_module).items() if isinstance(v, type)}
    assert not [(p, f["title"]) for p, f in fields.items() if f.get("title") in classes]
    assert (fields["spec.engine"]["title"], fields["spec.cluster"]["title"]) == ("Engine", "Cluster")
    # an optional field's empty tab reads "not set", not "None"
    assert [p for p, f in fields.items() if "null" in _tabs(f)] == []
    assert _tabs(fields["spec.engine.image"]) == ["string", "not set"]


@pytest.mark.parametrize("yaml_file", ["prefect.yaml", "deploy/prefect.gke.yaml"])
def test_the_wake_trigger_passes_the_event_s_time_in_a_form_the_server_accepts(yaml_file):
    """The wake trigger's parameters, rendered by Prefect's server as its automation does for the hold proxy's
    event, pass the wake_model deployment's parameter schema (the server refuses the run otherwise: a bare
    ``{{ event.occurred }}`` renders '2026-12-06 06:20:00+00:00', not a JSON-schema date-time) and carry the
    event's own time."""
    import asyncio
    import uuid
    from datetime import UTC, datetime

    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.server.utilities.user_templates import render_user_template
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    occurred = datetime(2026, 12, 6, 6, 20, 0, 500000, tzinfo=UTC)
    event = ReceivedEvent(id=uuid.uuid4(), occurred=occurred, event="llm-fleet.model.wake-requested",
                          resource={"prefect.resource.id": "llm-fleet.model.gemma", "prefect.resource.name": "gemma"},
                          payload={"spec": "deployments/gemma2-2b-it-vllm-l4.yaml", "model": "gemma", "held": 1})
    deployments = yaml.safe_load((ROOT / yaml_file).read_text())["deployments"]
    wake = [d for d in deployments if d["entrypoint"] == "flows/park.py:wake_model" and d.get("triggers")]
    assert wake
    for d in wake:
        params = {k: asyncio.run(render_user_template(v, {"event": event})) if isinstance(v, str) else v
                  for k, v in d["triggers"][0]["parameters"].items()}
        assert validate(params, parameter_schema(_flow(d["entrypoint"])).model_dump()) == [], params
        assert datetime.fromisoformat(params["requested_at"]) == occurred
