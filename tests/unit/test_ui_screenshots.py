"""The Prefect UI screenshots in docs/ show what prefect.yaml deploys today: every deployment by its name and
flow, and every automation. scripts/ui_screenshots.py writes what the page showed into each PNG (a text
chunk), so a deployment added to prefect.yaml without new pictures fails here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "run `uv run python scripts/ui_screenshots.py` (Chromium: scripts/bootstrap) and commit docs/ui-*.png"


def _script():
    spec = importlib.util.spec_from_file_location("ui_screenshots", ROOT / "scripts" / "ui_screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _shown(script, name: str) -> list[str] | None:
    text = script.text_chunks((ROOT / "docs" / name).read_bytes()).get(script.SHOWN_KEY)
    return json.loads(text) if text is not None else None


def test_the_text_chunk_round_trips():
    script = _script()
    png = (ROOT / "docs" / "ui-automations.png").read_bytes()
    again = script.with_text_chunk(png, "k", "v")
    assert script.text_chunks(again)["k"] == "v" and again.startswith(b"\x89PNG\r\n\x1a\n")


def test_the_ui_screenshots_show_every_deployment_and_automation_of_prefect_yaml():
    script = _script()
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    expected = sorted(f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}" for d in deployments)
    assert _shown(script, "ui-deployments.png") == expected, f"docs/ui-deployments.png is stale: {REGENERATE}"
    assert _shown(script, "ui-automations.png") == sorted(script.yaml_automation_names()), \
        f"docs/ui-automations.png is stale: {REGENERATE}"
