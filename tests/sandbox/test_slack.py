"""The Slack emulator through the real slack_sdk WebClient over HTTP."""

from __future__ import annotations

import json
import time

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from sandbox.core import Faults
from sandbox.slack import Slack

TOKEN = "xoxb-sandbox-test"


@pytest.fixture
def slack():
    s = Slack(faults=Faults(), token=TOKEN)
    s.start()
    yield s
    s.stop()


def client(slack: Slack, token: str | None = TOKEN, retry: bool = False) -> WebClient:
    c = WebClient(token=token, base_url=slack.url + "/api/", timeout=5)
    if retry:
        c.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=2))
    return c


def test_auth_test(slack):
    r = client(slack).auth_test()
    assert r["ok"] and r["user_id"] == "U0LLMFLEET" and r["bot_id"] == "B0LLMFLEET" and r["team"] == "Sandbox"


def test_post_thread_reply_update_and_read_back(slack):
    c = client(slack)
    head = c.chat_postMessage(channel="#deploys", text="deploying gemma...", unfurl_links=False)
    assert head["ok"] and head["channel"].startswith("C") and head["message"]["text"] == "deploying gemma..."
    cid, ts = head["channel"], head["ts"]
    r1 = c.chat_postMessage(channel="#deploys", text="preflight ok", thread_ts=ts)
    r2 = c.chat_postMessage(channel=cid, text="model ready", thread_ts=ts)
    assert r1["message"]["thread_ts"] == ts and float(r2["ts"]) > float(r1["ts"]) > float(ts)
    up = c.chat_update(channel=cid, ts=ts, text="deployed gemma :white_check_mark:")
    assert up["ok"] and up["text"].startswith("deployed") and up["message"]["edited"]["user"] == "U0LLMFLEET"

    replies = c.conversations_replies(channel=cid, ts=ts)["messages"]
    assert [m["text"] for m in replies] == ["deployed gemma :white_check_mark:", "preflight ok", "model ready"]
    assert replies[0]["reply_count"] == 2 and replies[0]["latest_reply"] == r2["ts"]
    history = c.conversations_history(channel=cid)["messages"]
    assert [m["text"] for m in history] == ["deployed gemma :white_check_mark:"]  # replies stay in the thread

    msgs = slack.messages("#deploys")
    assert [m["text"] for m in msgs] == ["deployed gemma :white_check_mark:", "preflight ok", "model ready"]
    assert msgs[0]["edits"] == ["deploying gemma..."] and msgs[0]["reply_count"] == 2
    assert [m["is_reply"] for m in msgs] == [False, True, True]
    assert all(m["channel"] == "#deploys" and m["channel_id"] == cid for m in msgs)
    assert slack.messages(cid) == msgs == slack.messages("deploys")
    assert [m["text"] for m in slack.thread("#deploys", ts)] == [m["text"] for m in msgs]


def test_blocks_json_and_form_encoded_calls(slack):
    c = client(slack)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*bold*"}}]
    r = c.chat_postMessage(channel="#llm-fleet", text="fallback", blocks=blocks)
    assert r["message"]["blocks"] == blocks
    # api_call with params: a form-encoded POST body, token in the header
    r2 = c.api_call("chat.postMessage", params={"channel": "#llm-fleet", "text": "form body"})
    assert r2["ok"]
    # GET with the token as a query argument, the oldest Slack style
    r3 = WebClient(base_url=slack.url + "/api/").api_call(
        "conversations.history", http_verb="GET", params={"channel": r["channel"], "token": TOKEN})
    assert [m["text"] for m in r3["messages"]] == ["form body", "fallback"]


def test_history_pagination(slack):
    c = client(slack)
    for i in range(5):
        c.chat_postMessage(channel="#random", text=f"m{i}")
    random = slack.channel_id("#random")
    page1 = c.conversations_history(channel=random, limit=2)
    assert [m["text"] for m in page1["messages"]] == ["m4", "m3"] and page1["has_more"]
    page2 = c.conversations_history(channel=random, limit=2, cursor=page1["response_metadata"]["next_cursor"])
    assert [m["text"] for m in page2["messages"]] == ["m2", "m1"]
    # slack_sdk's own paginator (it yields the same response object, refilled page by page)
    assert sum(len(p["messages"]) for p in c.conversations_history(channel=random, limit=2)) == 5


@pytest.mark.parametrize(("token", "error"), [(None, "not_authed"), ("xoxb-real-token", "invalid_auth"),
                                              ("xoxp-sandbox", "invalid_auth"),
                                              ("xoxb-sandbox-test-but-not-ours", "invalid_auth")])
def test_auth_errors_raise_slack_api_error(slack, token, error):
    with pytest.raises(SlackApiError) as info:
        client(slack, token).chat_postMessage(channel="#general", text="x")
    assert info.value.response.status_code == 200 and info.value.response["ok"] is False
    assert info.value.response["error"] == error
    assert slack.messages("#general") == []


@pytest.mark.filterwarnings("ignore:The top-level `text` argument is missing")
def test_channel_and_message_errors(slack):
    c = client(slack)
    slack.remove_channel("#gone")
    slack.archive_channel("#old")
    general = slack.channel_id("#general")
    cases = [
        (lambda: c.chat_postMessage(channel="#gone", text="x"), "channel_not_found"),
        (lambda: c.chat_postMessage(channel="C0NOTACHAN", text="x"), "channel_not_found"),
        (lambda: c.chat_postMessage(channel="#old", text="x"), "is_archived"),
        (lambda: c.chat_postMessage(channel="#general", text=""), "no_text"),
        (lambda: c.chat_postMessage(channel="#general", text="x" * 40001), "msg_too_long"),
        (lambda: c.chat_postMessage(channel="#general", text="x", thread_ts="1.000001"), "thread_not_found"),
        (lambda: c.chat_update(channel=general, ts="1.000001", text="x"), "message_not_found"),
        (lambda: c.conversations_replies(channel=general, ts="1.000001"), "thread_not_found"),
        (lambda: c.api_call("chat.nonsense"), "unknown_method"),
    ]
    for call, error in cases:
        with pytest.raises(SlackApiError) as info:
            call()
        assert info.value.response["error"] == error
    assert slack.messages() == []
    assert [x["error"] for x in slack.calls] == [e for _, e in cases]


def test_rate_limit_is_retried_by_rate_limit_handler(slack):
    # Retry-After: 1 -> the handler sleeps 1 s + jitter, past the 0.5 s window
    slack.set_rate_limit("chat.postMessage", calls=1, per_seconds=0.5, retry_after=1)
    c = client(slack, retry=True)
    t0 = time.perf_counter()
    c.chat_postMessage(channel="#llm-fleet", text="one")
    c.chat_postMessage(channel="#llm-fleet", text="two")  # 429 first, then retried after Retry-After
    assert [m["text"] for m in slack.messages("#llm-fleet")] == ["one", "two"]
    assert any(x["error"] == "ratelimited" for x in slack.calls)
    assert time.perf_counter() - t0 < 5
    # without a retry handler, the 429 surfaces as SlackApiError with the status and Retry-After
    slack.set_rate_limit("chat.postMessage", calls=1, per_seconds=30.0)
    c2 = client(slack)
    c2.chat_postMessage(channel="#llm-fleet", text="three")
    with pytest.raises(SlackApiError) as info:
        c2.chat_postMessage(channel="#llm-fleet", text="four")
    assert info.value.response.status_code == 429 and info.value.response["error"] == "ratelimited"
    assert int(info.value.response.headers["retry-after"][0]) >= 1
    slack.set_rate_limit("chat.postMessage", None)
    c2.chat_postMessage(channel="#llm-fleet", text="five")
    assert [m["text"] for m in slack.messages("#llm-fleet")] == ["one", "two", "three", "five"]


def test_fault_rule_429_retried(slack):
    slack.faults.add(service="slack", path=r"chat\.update", status=429, count=1, headers={"Retry-After": "0"},
                     body={"ok": False, "error": "ratelimited"})
    c = client(slack, retry=True)
    head = c.chat_postMessage(channel="#general", text="v1")
    c.chat_update(channel=head["channel"], ts=head["ts"], text="v2")
    assert slack.messages("#general")[0]["text"] == "v2"
    assert slack.faults.list()[0]["hits"] == 1


def test_fault_rule_500_and_latency(slack):
    slack.faults.add(service="slack", status=500, count=1)
    c = client(slack)
    with pytest.raises(SlackApiError) as info:
        c.auth_test()
    assert info.value.response.status_code == 500
    slack.faults.add(service="slack", latency=0.15, count=1)
    t0 = time.perf_counter()
    assert c.auth_test()["ok"]
    assert time.perf_counter() - t0 >= 0.15


def test_conversations_list_info_delete_and_snapshot(slack):
    c = client(slack)
    names = {ch["name"] for ch in c.conversations_list()["channels"]}
    assert {"general", "llm-fleet", "random"} <= names
    cid = slack.channel_id("#general")
    assert c.conversations_info(channel=cid)["channel"]["name"] == "general"
    ts = c.chat_postMessage(channel=cid, text="oops")["ts"]
    c.chat_delete(channel=cid, ts=ts)
    assert c.conversations_history(channel=cid)["messages"] == []
    assert slack.messages("#general")[0]["deleted"] is True
    snap = slack.snapshot()
    assert snap["channels"]["general"]["messages"] == 1
    json.dumps(snap)


# ---- what real Slack refuses -------------------------------------------------------------------------

def test_update_and_delete_need_the_channel_id(slack):
    """chat.update / chat.delete with a channel name: channel_not_found (python-slack-sdk #696)."""
    c = client(slack)
    head = c.chat_postMessage(channel="#llm-fleet", text="v1")  # a name is fine here
    for channel in ("#llm-fleet", "llm-fleet"):
        for call in (lambda ch=channel: c.chat_update(channel=ch, ts=head["ts"], text="v2"),
                     lambda ch=channel: c.chat_delete(channel=ch, ts=head["ts"]),
                     lambda ch=channel: c.conversations_history(channel=ch)):
            with pytest.raises(SlackApiError) as info:
                call()
            assert info.value.response["error"] == "channel_not_found"
    assert [m["text"] for m in slack.messages("#llm-fleet")] == ["v1"]  # nothing changed
    c.chat_update(channel=head["channel"], ts=head["ts"], text="v2")  # the ID the post returned works
    assert slack.messages("#llm-fleet")[0]["text"] == "v2"


def test_not_in_channel_and_revoked_token(slack):
    c = client(slack)
    slack.add_channel("#ops", member=False)  # the bot was never invited
    for call in (lambda: c.chat_postMessage(channel="#ops", text="x"),
                 lambda: c.conversations_history(channel=slack.channel_id("#ops"))):
        with pytest.raises(SlackApiError) as info:
            call()
        assert info.value.response["error"] == "not_in_channel"
    slack.revoke_token(TOKEN)
    with pytest.raises(SlackApiError) as info:
        c.auth_test()
    assert info.value.response["error"] == "token_revoked"
