"""Where models serve: one implementation of ``targets.base.ServingTarget`` per target.

``target_for(spec)`` is the one place that reads ``spec.target``; flows call it once and use the verbs.
A new target is a new module here plus one line in ``_TARGETS``.
"""

from __future__ import annotations

from targets.base import Check, ServingTarget, SpecRef, Unsupported

__all__ = ["Check", "ServingTarget", "Unsupported", "target_for"]


def _gke() -> ServingTarget:
    from targets.gke import GKE

    return GKE()


def _vertex() -> ServingTarget:
    from targets.vertex import VertexAI

    return VertexAI()


# Imported on first use: a GKE flow run never loads the Vertex AI client, nor the other way round.
_TARGETS = {"gke": _gke, "vertex": _vertex}


def target_for(spec: SpecRef) -> ServingTarget:
    """The target the spec (object, path or mapping) names in ``target:``."""
    from manifests.spec import resolve_spec

    return _TARGETS[resolve_spec(spec).target]()
