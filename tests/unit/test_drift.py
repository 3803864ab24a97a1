"""A hand edit is a field we applied that another writer owns now (managedFields), not any difference
between the new spec and the live object: a normal release changes the template itself, without a warning."""

from __future__ import annotations

from tasks.k8s import _foreign_edits

OURS = {"manager": "llm-fleet", "operation": "Apply", "fieldsV1": {
    "f:metadata": {"f:labels": {"f:app": {}}},
    "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {'k:{"name":"vllm"}': {
        "f:image": {}, "f:env": {}}}}}}}}


def _live(*managers: dict) -> dict:
    return {"metadata": {"name": "m-blue", "managedFields": [OURS, *managers]}, "spec": {}}


def test_our_own_change_is_no_drift():
    desired = {"metadata": {"labels": {"app": "m"}},
               "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "vllm", "image": "new"}]}}}}
    # a new release: the template differs from live, but every field is still ours -> nothing reported
    assert _foreign_edits(desired, _live()) == {}
    # the HPA's scale subresource and a controller's status are not hand edits either
    hpa = {"manager": "kube-controller-manager", "operation": "Update", "subresource": "scale",
           "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    # the product's own selector switch / annotations go through as llm-fleet (operation Update)
    switch = {"manager": "llm-fleet", "operation": "Update", "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}}}}
    assert _foreign_edits(desired, _live(hpa, switch)) == {}


def test_a_hand_edit_names_the_field_and_who():
    desired = {"metadata": {"labels": {"app": "m"}},
               "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "vllm", "image": "new"}]}}}}
    edit = {"manager": "kubectl-edit", "operation": "Update", "fieldsV1": {"f:spec": {"f:template": {"f:spec": {
        "f:containers": {'k:{"name":"vllm"}': {"f:env": {}}}}}}}}
    assert _foreign_edits(desired, _live(edit)) == {"spec.template.spec.containers": "kubectl-edit"}
    # a field we do not set (someone's own annotation) is theirs to keep
    theirs = {"manager": "kubectl-annotate", "operation": "Update",
              "fieldsV1": {"f:metadata": {"f:annotations": {"f:note": {}}}}}
    assert _foreign_edits(desired, _live(theirs)) == {}
