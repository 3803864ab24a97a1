"""Issue 13.7: a server that echoes the HF token (plain or base64) never puts it in a Prefect state message."""

from __future__ import annotations

import base64

import pytest

from tests.flows.conftest import spec_dict

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_token_echoed_by_a_server_is_scrubbed_from_the_failed_state(sandbox, sbc):
    from flows.deploy_model import deploy_model

    token = sandbox.env()["HF_TOKEN"]
    b64 = base64.b64encode(token.encode()).decode()
    spec = spec_dict("gemma2-2b-it-vllm-l4.yaml")
    sbc.add_fault(service="hub", method="GET", path=r"/api/models/google/gemma-2-2b-it", status=400,
                  body={"error": f"Bad request for token {token} (Authorization: Basic {b64})"})
    state = deploy_model(spec=spec, return_state=True)
    assert state.is_failed()
    assert "Bad request for token" in state.message  # the server's words are kept ...
    assert token not in state.message and b64 not in state.message  # ... its secret is not
    with pytest.raises(Exception) as err:  # noqa: B017 - whatever the Hub client raised
        state.result()
    assert token not in str(err.value) and b64 not in str(err.value)
    for msg in sbc.slack_messages():
        assert token not in msg.get("text", "") and b64 not in msg.get("text", "")
