"""Attacks through the deployment triggers: what an event may make release_model / wake_model do.

The triggers in prefect.yaml pass ``source: event`` (a constant the event cannot change) beside the
event's ``spec`` / ``revision``. Such a run only takes a spec file under a trusted directory and a commit
on the spec's tracked branch newer than the one serving (the sandbox Hub's ``list_repo_commits`` and the
live Deployment's revision annotation); everything else fails with ``TriggerRefused`` before anything is
created — asserted on the sandbox (GKE operations, the model's objects and their generations).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
import yaml

from manifests.triggers import TriggerRefused, revision_refusal, trusted_spec_path
from tests.flows.conftest import ROOT, spec_dict

MODEL = "Qwen/Qwen2.5-7B-Instruct"
A, B, C, D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)


# ---- the pure rules ------------------------------------------------------------------------------

def test_only_a_path_under_a_trusted_directory(tmp_path):
    trusted = [ROOT / "deployments"]
    ok = trusted_spec_path("deployments/qwen2.5-7b-sglang.yaml", allowed_dirs=trusted, root=ROOT)
    assert ok == (ROOT / "deployments" / "qwen2.5-7b-sglang.yaml").resolve()
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: evil\n")
    (tmp_path / "trusted").mkdir()
    (tmp_path / "trusted" / "link.yaml").symlink_to(evil)
    cases = {
        "inline spec (a mapping)": {"name": "x", "model": "m", "engine": {"image": "evil", "args": ["sh"]}},
        "got a list": ["deployments/qwen2.5-7b-sglang.yaml"],
        "outside the trusted": str(evil),
        "outside the trusted ": "deployments/../tests/security/../../" + str(evil.relative_to("/")),
        "is not a .yaml": "deployments/../pyproject.toml",
        "does not exist": "deployments/nope.yaml",
    }
    for why, spec in cases.items():
        with pytest.raises(TriggerRefused, match=re.escape(why.strip())) as err:
            trusted_spec_path(spec, allowed_dirs=trusted, root=ROOT)
        assert str(err.value).startswith("event refused:") and "\n" not in str(err.value)
    with pytest.raises(TriggerRefused, match="outside the trusted"):  # a symlink out of the directory
        trusted_spec_path(str(tmp_path / "trusted" / "link.yaml"), allowed_dirs=[tmp_path / "trusted"], root=ROOT)


@pytest.mark.parametrize(("revision", "history", "serving", "why"), [
    (C, [C, B, A], B, None),                         # newer than serving, on the branch
    (C, [C, B, A], None, None),                      # nothing serves yet
    ("main", [C, B, A], B, "not a 40-hex commit"),   # a branch name: whatever it points to by then
    ("v1.0", [C, B, A], B, "not a 40-hex commit"),
    ({"sha": C}, [C, B, A], B, "not a 40-hex commit"),
    (None, [C, B, A], B, "not a 40-hex commit"),
    (C.upper(), [C, B, A], B, "not a 40-hex commit"),
    (D, [C, B, A], B, "not on the tracked branch"),  # another branch's or a PR's commit, or made up
    (C, None, B, "not on the tracked branch"),       # the branch is gone
    (B, [C, B, A], B, "already serving"),
    (A, [C, B, A], B, "older than the serving"),     # a replayed event
])
def test_revision_rules(revision, history, serving, why):
    found = revision_refusal(revision=revision, branch="main", history=history, serving=serving)
    assert (found is None) if why is None else (why in found and found.startswith("event refused:"))


# ---- through the flows, on the sandbox -------------------------------------------------------------

@pytest.fixture
def trusted_dir(tmp_path, monkeypatch):
    """Specs the tests write, trusted (LLM_FLEET_TRUSTED_SPEC_DIRS) besides nothing else."""
    from tasks.settings import reload_settings

    d = tmp_path / "trusted"
    d.mkdir()
    monkeypatch.setenv("LLM_FLEET_TRUSTED_SPEC_DIRS", str(d))
    reload_settings()
    yield d
    os.environ.pop("LLM_FLEET_TRUSTED_SPEC_DIRS", None)
    reload_settings()


def _gke_ops(sbc, project: str) -> list:
    return [op["name"] for op in sbc.state()["gke"]["operations"] if f"/projects/{project}/" in op["selfLink"]]


@pytest.mark.usefixtures("prefect_server")
def test_event_with_an_inline_or_outside_spec_starts_nothing(sbc, trusted_dir, tmp_path):
    from flows.park import wake_model
    from flows.release_model import release_model

    spec = spec_dict("qwen2.5-7b-sglang.yaml")
    project = spec["cluster"]["project"]
    outside = tmp_path / "outside.yaml"
    outside.write_text(yaml.safe_dump(spec))
    for bad in (spec, str(outside), f"{trusted_dir}/../outside.yaml"):
        with pytest.raises(TriggerRefused):
            release_model(spec=bad, revision=A, source="event")
        with pytest.raises(TriggerRefused):
            wake_model(spec=bad, source="event")
    assert _gke_ops(sbc, project) == [] and sbc.state()["gke"]["clusters"] is not None
    assert not [c for c in sbc.state()["gke"]["clusters"] if project in str(c)]


@pytest.mark.long
@pytest.mark.usefixtures("prefect_server")
def test_event_revisions_off_the_branch_older_or_replayed_change_nothing(sbc, sandbox, trusted_dir):
    from flows.deploy_model import deploy_model
    from flows.provision_cluster import provision_cluster
    from flows.release_model import release_model
    from tests.flows.test_deploy_model import kube

    branch = f"sec-{uuid.uuid4().hex[:8]}"
    serving = sbc.push_revision(MODEL, branch=branch)
    data = spec_dict("qwen2.5-7b-sglang.yaml", name="qwen-sec", namespace="qwen-sec")
    data["model"] = {"id": MODEL, "revision": branch}
    path = Path(trusted_dir) / "qwen-sec.yaml"
    path.write_text(yaml.safe_dump(data))
    provision_cluster(spec=str(path))
    assert deploy_model(spec=str(path))["revision"] == serving
    newer = sbc.push_revision(MODEL, branch=branch)
    elsewhere = sbc.push_revision(MODEL, branch=f"{branch}-pr")  # what a Hub PR's commit is: not on the branch
    older = sandbox.hub.resolve(MODEL, "v1.0")                    # an ancestor: the branch's history has it

    _, apps, _ = kube(data)

    def state() -> tuple:
        deps = apps.list_namespaced_deployment("qwen-sec").items
        return (sorted((d.metadata.name, d.metadata.generation, d.spec.replicas) for d in deps),
                _gke_ops(sbc, data["cluster"]["project"]))

    before = state()
    for revision, why in [(elsewhere, "not on the tracked branch"), ("f" * 40, "not on the tracked branch"),
                          (branch, "not a 40-hex commit"), (serving, "already serving"),
                          (older, "older than the serving")]:
        with pytest.raises(TriggerRefused, match=why):
            release_model(spec=str(path), revision=revision, source="event")
    assert state() == before
    # The newer commit of the branch is admitted (a dry run: the plan only).
    plan = release_model(spec=str(path), revision=newer, source="event", dry_run=True)
    assert plan["dry_run"] and state() == before
