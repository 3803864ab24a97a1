"""Flow tests: one sandbox and one Prefect test server per session; real clients, real HTTP."""

from __future__ import annotations

import copy
import os
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TIME_SCALE = 0.002  # a 5-minute cluster create takes 0.6 s


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    from sandbox.app import Sandbox

    state_dir = tmp_path_factory.mktemp("sandbox")
    sb = Sandbox(time_scale=TIME_SCALE, state_dir=state_dir)
    sb.start()
    saved = dict(os.environ)
    os.environ.update(sb.env())
    os.environ["LLM_FLEET_TIME_SCALE"] = str(TIME_SCALE)
    os.environ["LLM_FLEET_KUBE_DIR"] = str(state_dir / "kube")
    from tasks.settings import reload_settings

    reload_settings()
    yield sb
    sb.stop()
    os.environ.clear()
    os.environ.update(saved)
    reload_settings()


@pytest.fixture(scope="session")
def prefect_server(sandbox):
    from tests.flows.harness import prefect_test_server

    with prefect_test_server():
        yield


@pytest.fixture
def sbc(sandbox):
    """The sandbox's control API; faults and behaviors are cleared after each test."""
    from sandbox.client import SandboxClient

    client = SandboxClient(sandbox.env()["LLM_FLEET_SANDBOX_URL"])
    yield client
    client.clear_faults()
    client.clear_behaviors()
    client.clear_stockouts()


def unique_project() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def spec_dict(filename: str, **overrides) -> dict:
    """A bundled spec as a dict, in a project of its own so tests never share clusters or quota."""
    data = yaml.safe_load((ROOT / "deployments" / filename).read_text())
    data = copy.deepcopy(data)
    data["cluster"]["project"] = unique_project()
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data
