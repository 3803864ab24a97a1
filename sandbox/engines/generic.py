"""Any other image (nginx, busybox...): a plain web server, ready after a second, 200 with a welcome page on
every GET (503 while starting), like nginx's default site.
"""

from __future__ import annotations

from sandbox.core import HttpError, route
from sandbox.engines.openai_api import _ModelHandler

_GENERIC: list = []


class GenericHandler(_ModelHandler):
    routes = _GENERIC


@route(_GENERIC, "GET", r"/.*")
def _generic_get(h: GenericHandler):
    if not h.pod.ready:
        raise HttpError(503, "starting")
    h.send_text(200, "<html><body><h1>Welcome!</h1></body></html>\n", content_type="text/html")
