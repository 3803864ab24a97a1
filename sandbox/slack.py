"""Slack Web API emulator, for ``slack_sdk.WebClient(token, base_url=slack.url + "/api/")``.

Methods (``POST`` or ``GET`` ``/api/{method}``; arguments as a query string, a form body or a JSON
body; the token as ``Authorization: Bearer`` or a ``token`` argument), replies shaped like Slack's:

``auth.test``, ``chat.postMessage`` (``thread_ts`` replies, ``reply_broadcast``), ``chat.update``,
``chat.delete``, ``conversations.replies``, ``conversations.history`` (cursor pagination),
``conversations.list``, ``conversations.info``.

Errors are HTTP 200 with ``{"ok": false, "error": ...}`` (``not_authed``, ``invalid_auth``,
``channel_not_found``, ``is_archived``, ``no_text``, ``msg_too_long``, ``thread_not_found``,
``message_not_found``, ``invalid_arguments``, ``unknown_method``), which slack_sdk raises as
``SlackApiError``. Rate limits answer HTTP 429 with ``Retry-After`` and ``{"ok": false, "error":
"ratelimited"}``, which ``RateLimitErrorRetryHandler`` waits out: use :meth:`Slack.set_rate_limit`
(a sliding window per method) or a fault rule (``service="slack"``, ``status=429``,
``headers={"Retry-After": "1"}``).

As Slack does: only the workspace's tokens work (``token`` and those :meth:`add_token` adds; any other
-> ``invalid_auth``, a revoked one -> ``token_revoked``); ``chat.update`` and ``chat.delete`` take the
channel's **ID** (a ``#name`` or bare name -> ``channel_not_found``, python-slack-sdk #696), and so do
the ``conversations.*`` methods, while ``chat.postMessage`` also takes a name; posting to a public channel the bot is not a member of ->
``not_in_channel`` (:meth:`add_channel` ``member=False``; reading its history too).

Channels are created on first post (``auto_create=True``: a workspace where every channel the specs
name exists and has the bot in it) except names given to :meth:`remove_channel`; ``#general``,
``#llm-fleet`` and ``#random`` exist from the start. :meth:`messages` returns what was posted, with
threads and edit history, for assertions.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
import zlib
from collections import deque
from typing import Any
from urllib.parse import parse_qs

from sandbox.core import Clock, Emulator, Faults, HttpError, JsonHandler, SandboxHTTPServer, route

TEAM_ID, TEAM = "T0SANDBOX1", "Sandbox"
BOT_USER_ID, BOT_ID, BOT_NAME = "U0LLMFLEET", "B0LLMFLEET", "llm-fleet"
MAX_TEXT = 40000


class SlackError(Exception):
    """An ``{"ok": false, "error": code}`` reply."""

    def __init__(self, code: str, **extra: Any) -> None:
        super().__init__(code)
        self.code = code
        self.extra = extra


def _channel_id(name: str) -> str:
    alphabet = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
    n, out = zlib.crc32(name.encode()) | (len(name) << 32), ""
    while len(out) < 9:
        n, r = divmod(n, len(alphabet))
        out += alphabet[r]
    return "C0" + out


class Slack(Emulator):
    """Slack Web API on 127.0.0.1 (service ``"slack"`` for faults)."""

    def __init__(self, *, faults: Faults, clock: Clock | None = None, token: str = "xoxb-sandbox-token",
                 auto_create: bool = True) -> None:
        self.faults = faults
        self.clock = clock
        self.token = token  # what the sandbox's env file hands to the product
        self._tokens: set[str] = {token}
        self._revoked: set[str] = set()
        self.auto_create = auto_create
        self._lock = threading.RLock()
        self._channels: dict[str, dict[str, Any]] = {}  # id -> {"name", "archived", "created"}
        self._by_name: dict[str, str] = {}
        self._removed: set[str] = set()
        self._messages: dict[str, list[dict[str, Any]]] = {}  # channel id -> messages in ts order
        self._last_ts = 0.0
        self._limits: dict[str, tuple[int, float, int | None]] = {}  # method -> (calls, window s, retry_after)
        self._calls: dict[str, deque[float]] = {}
        self.calls: list[dict[str, Any]] = []  # every API call: method, ok, error (for assertions)
        self._handler = SlackHandler
        self._server: SandboxHTTPServer | None = None
        for name in ("general", "llm-fleet", "random"):
            self.add_channel(name)

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def api_url(self) -> str:
        """What to pass as ``WebClient(base_url=...)``."""
        return self.url + "/api/"

    # ---- control ---------------------------------------------------------------------------------
    def add_token(self, token: str) -> None:
        """Another bot token of this workspace (e.g. a second app)."""
        with self._lock:
            self._tokens.add(token)
            self._revoked.discard(token)

    def revoke_token(self, token: str) -> None:
        """The token stops working: calls get ``token_revoked``."""
        with self._lock:
            self._tokens.discard(token)
            self._revoked.add(token)

    def add_channel(self, name: str, *, archived: bool = False, member: bool = True) -> str:
        """A public channel; ``member=False``: the bot was never invited (posts -> ``not_in_channel``)."""
        name = name.lstrip("#")
        with self._lock:
            self._removed.discard(name)
            cid = self._by_name.get(name) or _channel_id(name)
            self._channels[cid] = {"name": name, "archived": archived, "member": member,
                                   "created": self._channels.get(cid, {}).get("created", int(time.time()))}
            self._by_name[name] = cid
            self._messages.setdefault(cid, [])
            return cid

    def archive_channel(self, name: str, archived: bool = True) -> None:
        with self._lock:
            cid = self._by_name.get(name.lstrip("#")) or self.add_channel(name)
            self._channels[cid]["archived"] = archived

    def remove_channel(self, name: str) -> None:
        """The channel no longer exists (and is not auto-created): posts get ``channel_not_found``."""
        name = name.lstrip("#")
        with self._lock:
            self._removed.add(name)
            cid = self._by_name.pop(name, None)
            if cid:
                self._channels.pop(cid, None)
                self._messages.pop(cid, None)

    def set_rate_limit(self, method: str = "*", calls: int | None = 1, per_seconds: float = 1.0,
                       retry_after: int | None = None) -> None:
        """At most ``calls`` calls of ``method`` (or any, ``"*"``) per ``per_seconds``; None removes it.

        Over the limit: HTTP 429, ``Retry-After`` (default: seconds until the window frees a slot, ≥ 1).
        """
        with self._lock:
            if calls is None:
                self._limits.pop(method, None)
            else:
                self._limits[method] = (calls, per_seconds, retry_after)
            self._calls.pop(method, None)

    def clear(self) -> None:
        """Forget every message and call (channels stay)."""
        with self._lock:
            for msgs in self._messages.values():
                msgs.clear()
            self.calls.clear()

    # ---- inspection ------------------------------------------------------------------------------
    def channel_id(self, channel: str) -> str | None:
        with self._lock:
            if channel in self._channels:
                return channel
            return self._by_name.get(channel.lstrip("#"))

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        """Messages (top-level and replies) in post order, optionally of one channel (name or id).

        Each: ``channel`` ("#name"), ``channel_id``, ``ts``, ``thread_ts`` (replies and thread parents),
        ``is_reply``, ``text``, ``blocks``, ``attachments``, ``reply_count``, ``edits`` (earlier texts,
        oldest first), ``edited`` (ts of the last edit) and ``deleted``.
        """
        with self._lock:
            if channel is not None:
                cid = self.channel_id(channel)
                ids = [cid] if cid else []
            else:
                ids = list(self._messages)
            out = []
            for cid in ids:
                name = self._channels.get(cid, {}).get("name", cid)
                for m in self._messages.get(cid, []):
                    out.append({
                        "channel": f"#{name}", "channel_id": cid, "ts": m["ts"], "thread_ts": m.get("thread_ts"),
                        "is_reply": bool(m.get("thread_ts") and m["thread_ts"] != m["ts"]),
                        "text": m.get("text", ""), "blocks": m.get("blocks"), "attachments": m.get("attachments"),
                        "reply_count": m.get("reply_count", 0), "edits": list(m.get("_history", [])),
                        "edited": (m.get("edited") or {}).get("ts"), "deleted": bool(m.get("_deleted")),
                        "user": m.get("user"),
                    })
            out.sort(key=lambda m: float(m["ts"]))
            return out

    def thread(self, channel: str, ts: str) -> list[dict[str, Any]]:
        """The parent message and its replies, like ``conversations.replies``."""
        return [m for m in self.messages(channel) if m["ts"] == ts or m["thread_ts"] == ts]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "url": self._server.url if self._server else None,
                "channels": {c["name"]: {"id": cid, "archived": c["archived"],
                                         "messages": len(self._messages.get(cid, []))}
                             for cid, c in self._channels.items()},
                "rate_limits": {m: {"calls": c, "per_seconds": w} for m, (c, w, _) in self._limits.items()},
                "calls": len(self.calls),
                "messages": self.messages(),
            }

    # ---- API -------------------------------------------------------------------------------------
    def _next_ts(self) -> str:
        with self._lock:
            now = max(time.time(), self._last_ts + 1e-6)
            self._last_ts = round(now, 6)
            return f"{self._last_ts:.6f}"

    def _resolve_id(self, channel: Any) -> str:
        """chat.update / chat.delete: the channel's ID only (a name is ``channel_not_found``)."""
        if not isinstance(channel, str) or channel not in self._channels:
            raise SlackError("channel_not_found")
        return channel

    def _member_of(self, cid: str) -> str:
        if not self._channels[cid].get("member", True):
            raise SlackError("not_in_channel")
        return cid

    def _resolve_channel(self, channel: Any, *, create: bool) -> str:
        if not channel or not isinstance(channel, str):
            raise SlackError("channel_not_found")
        cid = self.channel_id(channel)
        if cid is None:
            name = channel.lstrip("#")
            is_id = channel[:1] in "CGD" and channel[1:].isalnum() and channel.upper() == channel and not \
                channel.startswith("#")
            if not create or not self.auto_create or is_id or name in self._removed:
                raise SlackError("channel_not_found")
            cid = self.add_channel(name)
        return cid

    def check_rate_limit(self, method: str) -> int | None:
        """Seconds to wait if this call is over a limit (and then it is not counted), else None."""
        now = time.monotonic()
        with self._lock:
            for key in (method, "*"):
                limit = self._limits.get(key)
                if limit is None:
                    continue
                calls, window, retry_after = limit
                q = self._calls.setdefault(key, deque())
                while q and now - q[0] >= window:
                    q.popleft()
                if len(q) >= calls:
                    wait = window - (now - q[0])
                    return retry_after if retry_after is not None else max(1, math.ceil(wait))
            for key in (method, "*"):
                if key in self._limits:
                    self._calls.setdefault(key, deque()).append(now)
        return None

    def call(self, method: str, args: dict[str, Any], auth: str | None) -> dict[str, Any]:
        """One API call: ``{"ok": true, ...}`` or raises SlackError."""
        token = None
        if auth and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        token = token or args.get("token")
        if not token:
            raise SlackError("not_authed")
        with self._lock:
            if token in self._revoked:
                raise SlackError("token_revoked")
            if token not in self._tokens:
                raise SlackError("invalid_auth")
        fn = _METHODS.get(method)
        if fn is None:
            raise SlackError("unknown_method", req_method=method)
        with self._lock:
            return fn(self, args)

    def _message(self, cid: str, ts: str) -> dict[str, Any]:
        for m in self._messages.get(cid, []):
            if m["ts"] == ts and not m.get("_deleted"):
                return m
        raise SlackError("message_not_found")

    @staticmethod
    def _public(m: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in m.items() if not k.startswith("_")}


def _text_of(args: dict[str, Any]) -> tuple[str, Any, Any]:
    text, blocks, attachments = args.get("text"), args.get("blocks"), args.get("attachments")
    for name, value in (("blocks", blocks), ("attachments", attachments)):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise SlackError(f"invalid_{name}") from None
            if name == "blocks":
                blocks = value
            else:
                attachments = value
    if not text and not blocks and not attachments:
        raise SlackError("no_text")
    if text and len(text) > MAX_TEXT:
        raise SlackError("msg_too_long")
    return text or "", blocks, attachments


def _post_message(s: Slack, args: dict[str, Any]) -> dict[str, Any]:
    cid = s._member_of(s._resolve_channel(args.get("channel"), create=True))
    if s._channels[cid]["archived"]:
        raise SlackError("is_archived")
    text, blocks, attachments = _text_of(args)
    ts = s._next_ts()
    msg: dict[str, Any] = {"user": BOT_USER_ID, "type": "message", "ts": ts, "bot_id": BOT_ID,
                           "app_id": "A0LLMFLEET", "text": text, "team": TEAM_ID,
                           "bot_profile": {"id": BOT_ID, "name": BOT_NAME, "deleted": False, "team_id": TEAM_ID}}
    if blocks:
        msg["blocks"] = blocks
    if attachments:
        msg["attachments"] = attachments
    thread_ts = args.get("thread_ts")
    if thread_ts:
        thread_ts = str(thread_ts)
        parent = next((m for m in s._messages[cid] if m["ts"] == thread_ts), None)
        if parent is not None and parent.get("thread_ts") not in (None, parent["ts"]):
            # a reply's ts: Slack threads it under the same parent
            thread_ts = parent["thread_ts"]
            parent = next((m for m in s._messages[cid] if m["ts"] == thread_ts), None)
        if parent is None or parent.get("_deleted"):
            raise SlackError("thread_not_found")
        msg["thread_ts"] = thread_ts
        msg["parent_user_id"] = parent["user"]
        parent["thread_ts"] = thread_ts
        parent["reply_count"] = parent.get("reply_count", 0) + 1
        parent["reply_users"] = sorted(set(parent.get("reply_users", [])) | {BOT_USER_ID})
        parent["reply_users_count"] = len(parent["reply_users"])
        parent["latest_reply"] = ts
        if str(args.get("reply_broadcast", "")).lower() in ("true", "1"):
            msg["subtype"] = "thread_broadcast"
    s._messages[cid].append(msg)
    return {"ok": True, "channel": cid, "ts": ts, "message": s._public(msg)}


def _update(s: Slack, args: dict[str, Any]) -> dict[str, Any]:
    cid = s._resolve_id(args.get("channel"))
    if not args.get("ts"):
        raise SlackError("invalid_arguments")
    msg = s._message(cid, str(args["ts"]))
    text, blocks, attachments = _text_of(args)
    msg.setdefault("_history", []).append(msg.get("text", ""))
    msg["text"] = text
    if blocks is not None:
        msg["blocks"] = blocks
    if attachments is not None:
        msg["attachments"] = attachments
    msg["edited"] = {"user": BOT_USER_ID, "ts": s._next_ts()}
    return {"ok": True, "channel": cid, "ts": msg["ts"], "text": text, "message": s._public(msg)}


def _delete(s: Slack, args: dict[str, Any]) -> dict[str, Any]:
    cid = s._resolve_id(args.get("channel"))
    msg = s._message(cid, str(args.get("ts", "")))
    msg["_deleted"] = True
    return {"ok": True, "channel": cid, "ts": msg["ts"]}


def _page(items: list[dict[str, Any]], args: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    try:
        limit = max(1, min(int(args.get("limit") or 100), 1000))
        start = int(base64.b64decode(args["cursor"]).decode().split(":", 1)[1]) if args.get("cursor") else 0
    except (ValueError, IndexError):
        raise SlackError("invalid_cursor") from None
    page = items[start:start + limit]
    more = start + limit < len(items)
    cursor = base64.b64encode(f"offset:{start + limit}".encode()).decode() if more else ""
    return page, cursor


def _in_window(m: dict[str, Any], args: dict[str, Any]) -> bool:
    ts = float(m["ts"])
    inclusive = str(args.get("inclusive", "")).lower() in ("true", "1")
    if args.get("oldest") and (ts < float(args["oldest"]) or (ts == float(args["oldest"]) and not inclusive)):
        return False
    return not (args.get("latest") and (ts > float(args["latest"]) or (ts == float(args["latest"])
                                                                        and not inclusive)))


def _replies(s: Slack, args: dict[str, Any]) -> dict[str, Any]:
    cid = s._member_of(s._resolve_id(args.get("channel")))
    ts = str(args.get("ts") or "")
    if not ts:
        raise SlackError("invalid_arguments")
    live = [m for m in s._messages[cid] if not m.get("_deleted")]
    parent = next((m for m in live if m["ts"] == ts), None)
    if parent is None:
        raise SlackError("thread_not_found")
    root = parent.get("thread_ts") or parent["ts"]
    thread = [m for m in live if m["ts"] == root or m.get("thread_ts") == root]
    thread = [thread[0]] + [m for m in thread[1:] if _in_window(m, args)] if thread else []
    page, cursor = _page([s._public(m) for m in thread], args)
    return {"ok": True, "messages": page, "has_more": bool(cursor), "response_metadata": {"next_cursor": cursor}}


def _history(s: Slack, args: dict[str, Any]) -> dict[str, Any]:
    cid = s._member_of(s._resolve_id(args.get("channel")))
    top = [m for m in s._messages[cid] if not m.get("_deleted") and
           (not m.get("thread_ts") or m["thread_ts"] == m["ts"] or m.get("subtype") == "thread_broadcast")]
    top = [s._public(m) for m in reversed(top) if _in_window(m, args)]
    page, cursor = _page(top, args)
    return {"ok": True, "messages": page, "has_more": bool(cursor), "pin_count": 0, "channel_actions_ts": None,
            "channel_actions_count": 0, "response_metadata": {"next_cursor": cursor}}


def _channel_json(s: Slack, cid: str) -> dict[str, Any]:
    c = s._channels[cid]
    return {"id": cid, "name": c["name"], "is_channel": True, "is_group": False, "is_im": False,
            "is_private": False, "is_archived": c["archived"], "is_general": c["name"] == "general",
            "is_member": c.get("member", True), "created": c["created"], "creator": "U0ADMIN000", "name_normalized": c["name"],
            "num_members": 3, "topic": {"value": "", "creator": "", "last_set": 0},
            "purpose": {"value": "", "creator": "", "last_set": 0}}


def _list(s: Slack, args: dict[str, Any]) -> dict[str, Any]:
    chans = [_channel_json(s, cid) for cid in sorted(s._channels)]
    if str(args.get("exclude_archived", "")).lower() in ("true", "1"):
        chans = [c for c in chans if not c["is_archived"]]
    page, cursor = _page(chans, args)
    return {"ok": True, "channels": page, "response_metadata": {"next_cursor": cursor}}


def _info(s: Slack, args: dict[str, Any]) -> dict[str, Any]:
    cid = s._resolve_id(args.get("channel"))
    return {"ok": True, "channel": _channel_json(s, cid)}


def _auth_test(s: Slack, args: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "url": "https://sandbox.slack.com/", "team": TEAM, "user": BOT_NAME, "team_id": TEAM_ID,
            "user_id": BOT_USER_ID, "bot_id": BOT_ID, "is_enterprise_install": False}


_METHODS = {
    "auth.test": _auth_test,
    "chat.postMessage": _post_message,
    "chat.update": _update,
    "chat.delete": _delete,
    "conversations.replies": _replies,
    "conversations.history": _history,
    "conversations.list": _list,
    "conversations.info": _info,
}

# ---- HTTP ------------------------------------------------------------------------------------------

_ROUTES: list = []


class SlackHandler(JsonHandler):
    service = "slack"
    routes = _ROUTES
    server: SandboxHTTPServer

    @property
    def slack(self) -> Slack:
        return self.server.state

    def error_body(self, err: HttpError) -> Any:
        if err.body is not None:
            return err.body
        return {"ok": False, "error": "ratelimited" if err.status == 429 else err.message}

    def args(self) -> dict[str, Any]:
        args: dict[str, Any] = {k: v[-1] for k, v in self.query.items()}
        raw = self.body_bytes()
        ctype = (self.headers.get("Content-Type") or "").lower()
        if raw:
            if "json" in ctype:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise SlackError("invalid_json") from None
                if not isinstance(body, dict):
                    raise SlackError("invalid_json")
                args.update(body)
            elif "multipart" in ctype:
                raise SlackError("invalid_form_data")
            else:
                args.update({k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"),
                                                            keep_blank_values=True).items()})
        return args


def _api(h: SlackHandler, method: str):
    slack = h.slack
    try:
        args = h.args()
    except SlackError as err:
        h.send_json(200, {"ok": False, "error": err.code})
        return None
    wait = slack.check_rate_limit(method)
    if wait is not None:
        with slack._lock:
            slack.calls.append({"method": method, "ok": False, "error": "ratelimited"})
        h.send_json(429, {"ok": False, "error": "ratelimited"}, headers={"Retry-After": str(wait)})
        return None
    try:
        reply = slack.call(method, args, h.headers.get("Authorization"))
    except SlackError as err:
        reply = {"ok": False, "error": err.code, **err.extra}
    with slack._lock:
        slack.calls.append({"method": method, "ok": reply["ok"], "error": reply.get("error"),
                            "channel": args.get("channel")})
    h.send_json(200, reply, headers={"X-Slack-Req-Id": f"sandbox-{time.time_ns():x}",
                                     "X-OAuth-Scopes": "chat:write,channels:history,channels:read"})
    return None


route(_ROUTES, "POST", r"/api/(?P<method>[A-Za-z]+(?:\.[A-Za-z]+)+)")(_api)
route(_ROUTES, "GET", r"/api/(?P<method>[A-Za-z]+(?:\.[A-Za-z]+)+)")(_api)
