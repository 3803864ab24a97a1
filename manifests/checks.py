"""One preflight line — a check's name, whether it passed, what was seen, the fix — shared by every
preflight (provision's quota and zones, the startup paths, a release's capacity) without importing them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
