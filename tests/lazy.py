"""Heavy client libraries imported on first use, not when a test module is collected.

Every xdist worker imports every test module to collect it, so a module-level import of a big client is
paid once per worker, most of which never run that module: `google.cloud.compute_v1` alone is ~1.2 s of
CPU, and the four workers collect at once at the start of the run."""

from __future__ import annotations

import importlib
from typing import Any


class lazy:  # noqa: N801 - stands where a module name stood
    """``lazy("openai").OpenAI`` imports ``openai`` at that first attribute read, in the worker that runs the
    test. Dunder reads answer AttributeError without importing: collection asks every module global for
    ``__test__`` (a ``LazyLoader`` module would load right there)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)
