"""The Hub's repo webhooks: on a push, POST the real (version 3) payload to every registered URL.

As on huggingface.co (https://huggingface.co/docs/hub/webhooks): a webhook watches some repos (or all),
a push to a branch sends ``event: {action: "update", scope: "repo.content"}`` with ``repo`` (``headSha``
= the sha of ``main``) and ``updatedRefs`` (``ref``, ``oldSha`` — null for a new ref — ``newSha``); the
secret, if set, travels verbatim in the ``X-Webhook-Secret`` header. Delivery is asynchronous (the push
does not wait for the receiver) and not retried; each attempt is logged like the Hub's activity tab.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


def _object_id(*parts: str) -> str:
    # Same derivation as the Hub emulator's ids (sha1 of ":"-joined parts, 24 hex like a Mongo ObjectId).
    return hashlib.sha1(":".join(parts).encode()).hexdigest()[:24]


@dataclass
class Webhook:
    id: str
    url: str
    secret: str | None = None
    repos: list[str] = field(default_factory=list)  # watched model repos; empty = every repo
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        """What the settings page shows: never the secret itself."""
        return {"id": self.id, "url": self.url, "has_secret": self.secret is not None, "repos": list(self.repos),
                "deliveries": list(self.deliveries)}


class Webhooks:
    def __init__(self) -> None:
        self._hooks: dict[str, Webhook] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def add(self, url: str, *, secret: str | None = None, repos: list[str] | None = None) -> Webhook:
        if not url.startswith(("http://", "https://")):
            raise ValueError("a webhook URL must start with http:// or https://")
        if secret is not None and not secret.isascii():
            raise ValueError("only ASCII characters are supported in a webhook secret")
        hook = Webhook(id=secrets.token_hex(12), url=url, secret=secret, repos=list(repos or []))
        with self._lock:
            self._hooks[hook.id] = hook
        return hook

    def remove(self, hook_id: str) -> bool:
        with self._lock:
            return self._hooks.pop(hook_id, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._hooks.clear()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [h.public() for h in self._hooks.values()]

    def repo_content_updated(self, *, repo_id: str, private: bool, tags: list[str], head_sha: str,
                             updated_refs: list[dict[str, str | None]], hub_url: str) -> None:
        """A push: deliver ``repo.content`` to every webhook watching ``repo_id`` (in the background)."""
        author = repo_id.split("/", 1)[0]
        payload = {
            "event": {"action": "update", "scope": "repo.content"},
            "repo": {"type": "model", "name": repo_id, "id": _object_id(repo_id, "_id"), "private": private,
                     "url": {"web": f"{hub_url}/{repo_id}", "api": f"{hub_url}/api/models/{repo_id}"},
                     "headSha": head_sha, "tags": list(tags), "owner": {"id": _object_id("user", author)}},
            "updatedRefs": updated_refs,
        }
        with self._lock:
            targets = [h for h in self._hooks.values() if not h.repos or repo_id in h.repos]
        for hook in targets:
            body = {**payload, "webhook": {"id": hook.id, "version": 3}}
            t = threading.Thread(target=self._deliver, args=(hook, body), daemon=True, name=f"webhook-{hook.id}")
            t.start()
            self._threads.append(t)

    def _deliver(self, hook: Webhook, body: dict[str, Any]) -> None:
        headers = {"X-Webhook-Secret": hook.secret} if hook.secret is not None else {}
        entry: dict[str, Any] = {"at": time.time(), "scope": body["event"]["scope"],
                                 "refs": [r["ref"] for r in body["updatedRefs"]]}
        t0 = time.monotonic()
        try:
            resp = httpx.post(hook.url, json=body, headers=headers, timeout=10.0)
            entry["status"] = resp.status_code
        except httpx.HTTPError as exc:
            entry["status"], entry["error"] = None, f"{type(exc).__name__}: {exc}"
        entry["seconds"] = round(time.monotonic() - t0, 4)
        with self._lock:
            hook.deliveries.append(entry)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Tests: wait for deliveries in flight."""
        for t in list(self._threads):
            t.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]
