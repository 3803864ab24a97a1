"""What the README says the operator may do cluster-wide is what manifests/render.py renders (issue 21: the README
said "nothing cluster-wide" while every model namespace got a ClusterRole and ClusterRoleBinding)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from manifests import names
from manifests.render import operator_rbac
from manifests.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
READS = {"get", "list", "watch"}


def _specs():
    for path in sorted((ROOT / "deployments").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("target", "gke") != "gke":
            continue
        yield path.name, parse_spec(data)
        # the optional cluster-scoped rules: a Gateway's CRD check
        yield path.name + " + gateway", parse_spec({**data, "expose": {**(data.get("expose") or {}),
                                                                       "ingress": None, "gateway": {}}})


SPECS = list(_specs())


def _readme_rbac() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("**RBAC the product renders**")
    return re.sub(r"\s+", " ", text[start:text.index("\n5. ", start)])


@pytest.mark.parametrize(("name", "spec"), SPECS, ids=[s[0] for s in SPECS])
def test_the_operator_writes_nothing_cluster_wide_but_its_own_objects(name, spec):
    role = next(o for o in operator_rbac(spec) if o["kind"] == "ClusterRole")
    own = {role["metadata"]["name"], names.compute_class(spec)}  # its ClusterRole/Binding, the spec's class
    for rule in role["rules"]:
        writes = set(rule["verbs"]) - READS
        if not writes:
            continue
        if rule.get("resourceNames"):  # a write pinned by name to the spec's own objects
            assert set(rule["resourceNames"]) <= own, rule
        else:  # create cannot be limited by name in RBAC: only the spec's ComputeClass kind
            assert writes == {"create"} and rule["resources"] == ["computeclasses"], rule


def test_the_readme_names_every_cluster_scoped_grant():
    """Every resource the ClusterRole grants, in any bundled spec (with or without a Gateway), is named in the
    README's RBAC paragraph, with the verb it gets."""
    said = _readme_rbac().lower()
    assert "nothing cluster-wide" not in said and "clusterrole" in said
    for name, spec in SPECS:
        role = next(o for o in operator_rbac(spec) if o["kind"] == "ClusterRole")
        for rule in role["rules"]:
            for resource in rule["resources"]:
                word = "itself" if resource.startswith("clusterrole") else resource
                assert re.search(rf"\b{word}\b", said), \
                    f"{name}: the README's RBAC paragraph does not name {resource} ({rule['verbs']})"
                for verb in rule["verbs"]:
                    assert f"`{verb}`" in said, f"{name}: {verb} of {resource} is not in the README"
