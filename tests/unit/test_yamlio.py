"""manifests.yamlio: libyaml's C parser where PyYAML has it, giving what ``yaml.safe_load`` gives."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from manifests import yamlio
from manifests.fleet import deployment_name
from manifests.spec import SpecError, load_spec

ROOT = Path(__file__).resolve().parents[2]
YAML_FILES = sorted(p for d in ("deployments", "manifests", "sandbox/addons", "deploy") for p in (ROOT / d).rglob("*.yaml"))


def test_the_c_parser_is_there():
    """PyYAML's wheels bundle libyaml: without it every kubeconfig, spec and CRD parse is 10-15x slower."""
    assert yamlio.Loader is yaml.CSafeLoader and yamlio.Dumper is yaml.CSafeDumper


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_of_the_repo_loads_as_safe_load_loads_it(path):
    text = path.read_text()
    assert yamlio.load_all(text) == list(yaml.safe_load_all(text))


def test_dump_round_trips_and_matches_safe_dump():
    config = {"apiVersion": "v1", "clusters": [{"name": "c", "cluster": {"server": "https://1.2.3.4",
                                                                        "certificate-authority-data": "x" * 200}}],
              "current-context": "c", "n": 1, "on": True, "empty": None, "date": "2026-12-06"}
    text = yamlio.dump(config, sort_keys=False)
    assert text == yaml.safe_dump(config, sort_keys=False)
    assert yamlio.load(text) == config


def test_a_request_body_is_json_first_then_yaml():
    assert yamlio.load_body('{"spec": {"replicas": 2}}') == {"spec": {"replicas": 2}}
    assert yamlio.load_body("spec:\n  replicas: 2\n") == {"spec": {"replicas": 2}}
    with pytest.raises(yaml.YAMLError):
        yamlio.load_body("spec: [unclosed")


def test_a_spec_with_bad_yaml_still_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncluster:\n  project: [p\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+, column \d+"):
        load_spec(bad)


def test_deployment_name_reads_prefect_yaml_again_when_it_changes(tmp_path):
    project = tmp_path / "prefect.yaml"
    project.write_text("deployments:\n- name: one\n  entrypoint: flows/park.py:park_model\n")
    assert deployment_name("park_model", project_file=project) == "park_model/one"
    project.write_text("deployments:\n- name: two\n  entrypoint: flows/park.py:park_model\n")
    later = time.time() + 5
    os.utime(project, (later, later))  # a coarse-mtime filesystem would otherwise see the same time
    assert deployment_name("park_model", project_file=project) == "park_model/two"
