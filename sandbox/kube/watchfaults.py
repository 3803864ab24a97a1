"""Watch faults as the real API server shows them: an expired resourceVersion and a dropped stream.

``watch_expire`` is what a client sees when etcd compacts past its watch (kube-apiserver's cacher ends
the watch with an ERROR event carrying a 410 ``Expired`` Status, on a 200 stream): the history is
compacted too, so resuming from the last resourceVersion seen gets 410 again and only a fresh list
helps. ``watch_drop`` is an API-server restart (GKE control-plane upgrade or repair): the connection
closes mid-stream, without the chunked terminator.
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandbox.core import FaultRule, JsonHandler
    from sandbox.kube.store import Store


def expired_status(message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": "Expired", "code": 410}


def break_watch(h: JsonHandler, fault: FaultRule, store: Store) -> None:
    """End a running watch stream the way ``fault.action`` says."""
    h.close_connection = True
    if fault.action == "watch_expire":
        rv = store.compact()
        h.write_chunk(json.dumps({"type": "ERROR", "object": expired_status(
            f"too old resource version: {rv - 1} ({rv})")}) + "\n")
        h.end_chunked()
        return
    with contextlib.suppress(OSError):  # watch_drop
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)
