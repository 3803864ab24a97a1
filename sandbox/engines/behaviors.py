"""Failure modes of the sandbox's model servers, chosen per pod by rules.

:class:`Behaviors` (also ``POST /sandbox/behaviors`` on the control API) picks the failure mode per pod:
``ok``, ``slow_load``, ``crash_loop``, ``oom``, ``image_pull_error``, ``wrong_answers`` (empty text, full
token count — what a broken dtype looks like once special tokens are skipped), ``http_500`` (every
generation fails), ``hang`` (generations never answer), ``long_prompt_errors`` / ``slow_long_prompts``
(only prompts of ``LONG_PROMPT_TOKENS`` or more fail with 500 / take 3x as long: a regression real traffic
meets and short smoke prompts do not). A rule matches on namespace, labels, model,
name, engine or Hub revision; the first live matching rule wins, and ``count`` limits how many container
starts it affects. No upstream: this is the sandbox's own fault-injection API.
"""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from sandbox.engines.container import ContainerInfo, describe_container

MODES = ("ok", "slow_load", "crash_loop", "oom", "image_pull_error", "wrong_answers", "http_500", "hang",
         "long_prompt_errors", "slow_long_prompts")
MATCH_KEYS = ("namespace", "labels", "model", "name", "engine", "revision")


@dataclass
class Behavior:
    """How the pods a rule matches behave. ``count``: how many container starts it affects (None: all)."""

    mode: str = "ok"
    match: dict[str, Any] = field(default_factory=dict)
    load_seconds: float | None = None  # cloud seconds (scaled by the clock); overrides the computed load time
    count: int | None = None
    tokens_per_s: float | None = None  # overrides the runtime's generation speed for these pods
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    hits: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if not isinstance(self.match, dict):
            raise ValueError("match must be an object: {namespace?, labels?, model?, name?, engine?}")
        unknown = set(self.match) - set(MATCH_KEYS)
        if unknown:
            raise ValueError(f"unknown match key(s) {', '.join(sorted(unknown))}; valid: {', '.join(MATCH_KEYS)}")
        if "labels" in self.match and not isinstance(self.match["labels"], dict):
            raise ValueError("match.labels must be an object of label: value")
        if self.count is not None and int(self.count) < 0:
            raise ValueError("count must be >= 0 (or null for every start)")
        if self.load_seconds is not None and float(self.load_seconds) < 0:
            raise ValueError("load_seconds must be >= 0")

    def matches(self, pod: dict[str, Any], info: ContainerInfo | None = None) -> bool:
        meta = pod.get("metadata") or {}
        m = self.match
        if m.get("namespace") and meta.get("namespace", "default") != m["namespace"]:
            return False
        labels = meta.get("labels") or {}
        if any(labels.get(k) != str(v) for k, v in (m.get("labels") or {}).items()):
            return False
        if m.get("name") and not re.search(m["name"], meta.get("name", "") or meta.get("generateName", "")):
            return False
        if m.get("model") or m.get("engine") or m.get("revision"):
            info = info or describe_container(pod)
            if m.get("model") and info.model_id != m["model"]:
                return False
            if m.get("engine") and info.engine != m["engine"]:
                return False
            # "The weights of this commit are broken": pods serving that Hub revision behave so.
            if m.get("revision") and info.revision != m["revision"]:
                return False
        return True

    def live(self) -> bool:
        return self.count is None or self.hits < int(self.count)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


OK = Behavior(mode="ok", id="default")


class Behaviors:
    """Thread-safe list of behavior rules; the first live matching rule wins."""

    def __init__(self) -> None:
        self._rules: list[Behavior] = []
        self._lock = threading.Lock()

    def add(self, behavior: Behavior | None = None, *, mode: str = "ok", match: dict[str, Any] | None = None,
            load_seconds: float | None = None, count: int | None = None, tokens_per_s: float | None = None,
            namespace: str | None = None, labels: dict[str, str] | None = None, model: str | None = None,
            name: str | None = None, engine: str | None = None, revision: str | None = None) -> Behavior:
        """Add a rule; ``namespace``/``labels``/``model``/``name``/``engine`` are shortcuts for ``match``."""
        if behavior is None:
            m = dict(match or {})
            for k, v in (("namespace", namespace), ("labels", labels), ("model", model), ("name", name),
                         ("engine", engine), ("revision", revision)):
                if v is not None:
                    m[k] = v
            behavior = Behavior(mode=mode, match=m, load_seconds=load_seconds, count=count,
                                tokens_per_s=tokens_per_s)
        with self._lock:
            self._rules.append(behavior)
        return behavior

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_dict() for r in self._rules]

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def remove(self, rule_id: str) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [r for r in self._rules if r.id != rule_id]
            return len(self._rules) < before

    def peek(self, pod: dict[str, Any], info: ContainerInfo | None = None) -> Behavior:
        """The rule that would apply to this pod now (no use consumed)."""
        with self._lock:
            for rule in self._rules:
                if rule.live() and rule.matches(pod, info):
                    return rule
        return OK

    def take(self, pod: dict[str, Any], info: ContainerInfo | None = None) -> Behavior:
        """The rule for one container start of this pod, with one use consumed."""
        with self._lock:
            for rule in self._rules:
                if rule.live() and rule.matches(pod, info):
                    rule.hits += 1
                    return rule
        return OK
