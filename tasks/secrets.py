"""Tokens read when a flow runs, never stored in a deployment: the environment first, else a Prefect Secret block.

Prefect resolves ``{{ prefect.blocks.secret.x }}`` in a deployment's job variables when the deployment is
created and stores the value in plain text in its configuration (PrefectHQ/prefect#14088); naming the
block instead (``LLM_FLEET_SLACK_TOKEN_BLOCK=slack-bot-token``) keeps the token in the block only.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import SecretStr

from tasks.settings import get_settings


@lru_cache(maxsize=8)
def _block_value(name: str) -> SecretStr | None:
    """One read per process (a flow run) and block: Slack helpers ask for the token on every message."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError:  # no such block
        return None
    return SecretStr(str(value)) if value else None


def slack_token() -> SecretStr | None:
    """$SLACK_BOT_TOKEN, else the Secret block named by $LLM_FLEET_SLACK_TOKEN_BLOCK, else None (Slack off)."""
    s = get_settings()
    if s.slack_token is not None:
        return s.slack_token
    return _block_value(s.slack_token_block) if s.slack_token_block else None
