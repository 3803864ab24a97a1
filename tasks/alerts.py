"""Slack alerts that live across runs: one message per incident, edited in place, resolved once.

Unlike a run's thread (tasks/slack.py), an alert is updated by later runs, so it keeps the channel
**ID** Slack answered with (``chat.update`` refuses a channel name) next to the message ts.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.clients import slack_client
from tasks.log import logger


@task(retries=0, cache_policy=NO_CACHE)
def open_alert(*, channel: str, text: str) -> dict[str, str] | None:
    """Post the incident's message; returns ``{"channel": ID, "ts": ts}`` (None when Slack is off/failing)."""
    client = slack_client()
    if client is None:
        return None
    try:
        resp = client.chat_postMessage(channel=channel, text=text, unfurl_links=False)
    except Exception as exc:  # noqa: BLE001 - alerts are best effort; the Prefect event still fires
        logger().warning("Slack alert to %s failed (%s)", channel, exc)
        return None
    return {"channel": resp["channel"], "ts": resp["ts"]}


@task(retries=0, cache_policy=NO_CACHE)
def edit_alert(*, alert: dict[str, str], text: str) -> bool:
    client = slack_client()
    if client is None:
        return False
    try:
        client.chat_update(channel=alert["channel"], ts=alert["ts"], text=text)
    except Exception as exc:  # noqa: BLE001
        logger().warning("Slack alert update failed (%s)", exc)
        return False
    return True


@task(retries=0, cache_policy=NO_CACHE)
def reply_alert(*, alert: dict[str, str], text: str) -> bool:
    client = slack_client()
    if client is None:
        return False
    try:
        client.chat_postMessage(channel=alert["channel"], thread_ts=alert["ts"], text=text, unfurl_links=False)
    except Exception as exc:  # noqa: BLE001
        logger().warning("Slack alert reply failed (%s)", exc)
        return False
    return True
