"""Issue 13.7: the HF token never survives into text the product writes — plain or base64."""

from __future__ import annotations

import base64
import json

from kubernetes.client.rest import ApiException

from manifests.errors import DeployError
from tasks.report import scrub_exception, scrub_text

TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"


def test_plain_and_base64_forms_are_scrubbed():
    b64 = base64.b64encode(TOKEN.encode()).decode()
    url = base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")
    text = f"token {TOKEN}; Secret data hf_token: {b64}; url-safe {url}"
    out = scrub_text(text, [TOKEN])
    assert TOKEN not in out and b64 not in out and url not in out
    assert out.count("***") == 3


def test_token_inside_a_larger_base64_blob_is_scrubbed_at_every_alignment():
    for prefix in ("", "a", "ab", "abc"):
        blob = base64.b64encode(json.dumps({"k": prefix, "token": TOKEN}).encode()).decode()
        out = scrub_text(f"config: {blob}", [TOKEN])
        assert "***" in out
        # what is left of the blob before the mask decodes to the JSON up to the token, no further
        left = out.split("***")[0].removeprefix("config: ")
        assert TOKEN[:3] not in base64.b64decode(left[: len(left) // 4 * 4]).decode("latin-1")
        assert len(out) <= len("config: ***") + len(blob) - len(TOKEN) * 4 // 3 + 4


def test_short_values_are_not_base64_scrubbed():
    assert scrub_text("abc YWJj", ["abc"]) == "*** YWJj"


def test_exceptions_are_scrubbed_in_place_for_the_prefect_state_message():
    cause = ApiException(status=422, reason="Unprocessable Entity")
    cause.body = json.dumps({"message": f"data.hf_token: Invalid value: {base64.b64encode(TOKEN.encode()).decode()}"})
    try:
        try:
            raise cause
        except ApiException as exc:
            raise DeployError(f"Secret rejected for {TOKEN}", f"rotate {TOKEN}") from exc
    except DeployError as err:
        scrub_exception(err, [TOKEN])
        assert TOKEN not in str(err) and TOKEN not in err.problem and TOKEN not in err.fix
        assert base64.b64encode(TOKEN.encode()).decode() not in str(err.__cause__)
