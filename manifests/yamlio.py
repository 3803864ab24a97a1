"""YAML in and out through libyaml's C parser and emitter where PyYAML was built with them.

PyYAML's ``safe_load`` is pure Python: 0.37 s for the Gateway API CRDs (490 KB) that every GKE cluster
with the Gateway API gets, a millisecond or more for each kubeconfig, spec and patch body. libyaml
parses the same documents with the same safe constructors (same types, same errors with line and
column) 10-15x faster. Without libyaml, the pure-Python classes are used.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str | bytes) -> Any:
    """``yaml.safe_load``."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a safe loader (C or Python)


def load_all(text: str | bytes) -> list[Any]:
    """``list(yaml.safe_load_all(...))``."""
    return list(yaml.load_all(text, Loader=Loader))  # noqa: S506 - a safe loader (C or Python)


def load_body(text: str | bytes) -> Any:
    """A request body a Kubernetes API server accepts: JSON (what clients send), else YAML (apply)."""
    try:
        return json.loads(text)
    except ValueError:
        return load(text)


def dump(data: Any, stream: Any = None, **options: Any) -> Any:
    """``yaml.safe_dump``."""
    return yaml.dump(data, stream, Dumper=Dumper, **options)

