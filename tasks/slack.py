"""Slack: one thread per flow run. Slack being down or misconfigured never fails a flow.

Plain functions, not Prefect tasks: a notification is best effort (the WebClient waits out 429s and
retries resets itself, and a failure is logged, never raised), and a task run per edit of the thread's
head would double every flow's task runs in the UI and on the API server.
"""

from __future__ import annotations

from tasks.clients import slack_client
from tasks.log import logger


def post_slack(*, channel: str, text: str, thread_ts: str | None = None) -> str | None:
    """Post a message (or a thread reply); returns its ts, or None when Slack is off or failing."""
    client = slack_client()
    if client is None:
        return None
    try:
        resp = client.chat_postMessage(channel=channel, text=text, thread_ts=thread_ts, unfurl_links=False)
    except Exception as exc:  # noqa: BLE001 - notifications are best effort by design
        logger().warning("Slack post to %s failed (%s); continuing without it", channel, exc)
        return None
    return resp.get("ts")


def open_thread(*, channel: str, text: str) -> tuple[str, str] | None:
    """Post a thread's first message; returns ``(channel ID, ts)``, or None when Slack is off or failing.

    Keep the ID: chat.update and chat.delete want the channel's ID, not its name (a name gets
    ``channel_not_found``; python-slack-sdk #696), and replies by ID survive a channel rename.
    """
    client = slack_client()
    if client is None:
        return None
    try:
        resp = client.chat_postMessage(channel=channel, text=text, unfurl_links=False)
    except Exception as exc:  # noqa: BLE001 - notifications are best effort by design
        logger().warning("Slack post to %s failed (%s); continuing without it", channel, exc)
        return None
    return resp.get("channel"), resp.get("ts")


def update_slack(*, channel: str, ts: str, text: str) -> bool:
    """Edit a message in place (the thread's head shows the run's progress); ``channel`` is the ID
    :func:`open_thread` returned."""
    client = slack_client()
    if client is None or not ts:
        return False
    try:
        client.chat_update(channel=channel, ts=ts, text=text)
    except Exception as exc:  # noqa: BLE001
        logger().warning("Slack update in %s failed (%s); continuing without it", channel, exc)
        return False
    return True
