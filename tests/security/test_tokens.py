"""Tokens are read when a flow runs, never resolved into a deployment's stored config.

The Slack bot token lives in a Prefect Secret block; the flow runs get only its *name*
(``LLM_FLEET_SLACK_TOKEN_BLOCK``) and read it at run time — unlike ``{{ prefect.blocks.secret.x }}`` in job
variables, which Prefect resolves at deploy time and stores in plain text (PrefectHQ/prefect#14088).
"""

from __future__ import annotations

import re
import uuid

import pytest

from tests.flows.conftest import ROOT


@pytest.mark.usefixtures("prefect_server")
def test_slack_token_comes_from_the_secret_block_at_run_time(sandbox, sbc, monkeypatch):
    from prefect.blocks.system import Secret

    from tasks import secrets
    from tasks.settings import reload_settings
    from tasks.slack import post_slack

    token = sandbox.env()["SLACK_BOT_TOKEN"]
    block = f"slack-bot-token-{uuid.uuid4().hex[:8]}"
    Secret(value=token).save(block)
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)
    monkeypatch.delenv("LLM_FLEET_SLACK_TOKEN", raising=False)
    monkeypatch.setenv("LLM_FLEET_SLACK_TOKEN_BLOCK", block)
    reload_settings()
    secrets._block_value.cache_clear()
    try:
        text = f"token from the block {uuid.uuid4().hex[:6]}"
        assert post_slack(channel="#llm-fleet", text=text) is not None
        assert any(m["text"] == text for m in sbc.slack_messages())
        # No block of that name: Slack is off, nothing raised.
        monkeypatch.setenv("LLM_FLEET_SLACK_TOKEN_BLOCK", "no-such-block")
        reload_settings()
        assert post_slack(channel="#llm-fleet", text="x") is None
    finally:
        monkeypatch.undo()
        reload_settings()
        secrets._block_value.cache_clear()


def test_no_deployment_config_resolves_a_secret_at_deploy_time():
    """prefect.yaml, the GKE variant and the job template carry no block template a deploy would resolve."""
    template = re.compile(r"\{\{\s*prefect\.blocks\.secret")
    for path in [ROOT / "prefect.yaml", *sorted((ROOT / "deploy").glob("*.yaml")), *sorted((ROOT / "deploy").glob("*.json"))]:
        assert not template.search(path.read_text()), f"{path.name} resolves a Secret block at deploy time"
