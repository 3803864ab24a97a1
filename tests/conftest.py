"""Test-wide settings: fast retries and polls, and a fresh kubectl cache. Set before any task import."""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
# Retries and operation polls in tests: same code paths, millisecond delays.
os.environ.setdefault("LLM_FLEET_RETRY_INITIAL_S", "0.01")
os.environ.setdefault("LLM_FLEET_RETRY_MAX_S", "0.05")
os.environ.setdefault("LLM_FLEET_RETRY_DEADLINE_S", "10")
os.environ.setdefault("LLM_FLEET_POLL_INITIAL_S", "0.01")
os.environ.setdefault("LLM_FLEET_POLL_MAX_S", "0.05")
os.environ.setdefault("LLM_FLEET_OPERATION_TIMEOUT_S", "60")
os.environ.setdefault("LLM_FLEET_MIN_LOAD_TIMEOUT_S", "3")


def pytest_collection_modifyitems(config, items):
    """The longest tests (marked ``long``) go first, so with ``-n 2`` one worker starts on them while the
    other takes the many short ones, instead of a four-minute test starting last."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
