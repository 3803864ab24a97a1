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


def test_revision_is_a_plain_optional_string_on_deploy_and_release():
    from prefect.utilities.callables import parameter_schema

    from flows.deploy_model import deploy_model
    from flows.release_model import release_model

    for flow in (deploy_model, release_model):
        rev = parameter_schema(flow).model_dump()["properties"]["revision"]
        assert rev["type"] == "string" and "anyOf" not in rev and rev["default"] is None
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
