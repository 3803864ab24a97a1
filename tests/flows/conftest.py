"""Flow tests: one sandbox and one Prefect test server per session; real clients, real HTTP."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TIME_SCALE = 0.002  # a 5-minute cluster create takes 0.6 s


# The session's sandbox, Prefect server and sandbox client (``sandbox``, ``prefect_server``, ``sbc``) are
# in tests/conftest.py: tests/security uses the same ones (one of each per session).


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
