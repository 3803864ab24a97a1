"""The run's logger inside a Prefect run, a plain logger outside one (benchmarks, `.fn()` calls)."""

from __future__ import annotations

import logging

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("llm_fleet")
