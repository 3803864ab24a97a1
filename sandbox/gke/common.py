"""The container v1 API's wire conventions, shared by every GKE area: the ``selfLink`` /
``targetLink`` base, errors as ``HttpError`` with the API's status name as reason (400
INVALID_ARGUMENT for bad input), RFC 3339 timestamps, and request bodies read through the
``google.cloud.container_v1`` proto types (enums as ints or names, unknown fields ignored ->
canonical proto JSON), as the REST transport and ``gcloud container`` send them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sandbox.core import HttpError

API_BASE = "https://container.googleapis.com/v1"


def _err(status: int, code: str, message: str) -> HttpError:
    return HttpError(status, message, reason=code)


def _bad(message: str) -> HttpError:
    return _err(400, "INVALID_ARGUMENT", message)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_dict(cls: Any, msg: Any) -> dict[str, Any]:
    return json.loads(cls.to_json(msg, use_integers_for_enums=False, always_print_fields_with_no_presence=False,
                                  indent=None))


def normalize(cls: Any, value: Any) -> dict[str, Any]:
    """Any JSON the clients send (enums as ints or names) -> canonical proto JSON (enum names)."""
    try:
        msg = cls.from_json(json.dumps(value), ignore_unknown_fields=True)
    except Exception as exc:  # json_format.ParseError and friends
        raise _bad(f"Invalid JSON payload received. {exc}") from exc
    return to_dict(cls, msg)
