"""Screenshots of the Prefect UI as an operator first meets it: the deployments (named for what they do)
and the automations (named for what they trigger), from `prefect deploy --all` of prefect.yaml on a fresh
local server. Writes docs/ui-deployments.png and docs/ui-automations.png.

    uv run python scripts/ui_screenshots.py      # needs Debian's chromium (scripts/bootstrap installs it)

Every deployment is on the one page (the pager shows 10 by default), and each PNG carries what the page
showed (`llm-fleet:shown`, a PNG text chunk: the deployments' `flow/name`s, the automations' names), so
tests/unit/test_ui_screenshots.py can tell when prefect.yaml has moved on and the pictures are stale.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHOWN_KEY = "llm-fleet:shown"


def with_text_chunk(png: bytes, key: str, text: str) -> bytes:
    """The PNG with a tEXt chunk (Latin-1 keyword, NUL, text) right after IHDR (PNG spec 11.3.4.3)."""
    data = key.encode("latin-1") + b"\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, IHDR length/type/data/crc
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def text_chunks(png: bytes) -> dict[str, str]:
    """Every tEXt chunk of a PNG, keyword -> text."""
    out, at = {}, 8
    while at < len(png):
        (length,), kind = struct.unpack(">I", png[at:at + 4]), png[at + 4:at + 8]
        if kind == b"tEXt":
            key, _, text = png[at + 8:at + 8 + length].partition(b"\0")
            out[key.decode("latin-1")] = text.decode("latin-1")
        at += 12 + length
    return out


def main() -> int:
    from playwright.sync_api import sync_playwright

    import tests.flows.server_support as support
    from tests.flows.server_support import prefect_cli, prefect_server

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    port = support.free_port()
    support.free_port = lambda: port  # the server's port is known first: the UI must be told its API address
    ui_env = {"PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_API_PORT": str(port)}
    with tempfile.TemporaryDirectory() as tmp, prefect_server(Path(tmp) / "home", **ui_env) as (api, env):
        prefect_cli("work-pool", "create", "local", "--type", "process", env=env)
        prefect_cli("--no-prompt", "deploy", "--all", env=env)
        ui = api.removesuffix("/api")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})

            page.goto(ui + "/deployments")
            # every deployment on one page: the list's "Items per page" (10) is kept in local storage
            page.evaluate("localStorage.setItem('deployment-list-limit', '50')")
            page.reload()
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(1500)
            rows = page.locator("tbody tr")
            # the UI scrolls inside its own pane (full_page sees the viewport only): tall enough for every row
            bottom = rows.last.bounding_box()
            page.set_viewport_size({"width": 1400, "height": max(1100, int(bottom["y"] + bottom["height"]) + 120)})
            page.wait_for_timeout(500)
            shown = []
            for row in rows.all_inner_texts():
                name, flow = [w.strip() for w in row.splitlines() if w.strip()][:2]
                shown.append(f"{flow}/{name}")
            _save(page, "ui-deployments.png", sorted(shown))

            page.set_viewport_size({"width": 1400, "height": 1100})
            page.goto(ui + "/automations")
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(1500)
            automations = yaml_automation_names()
            body = page.inner_text("body")
            _save(page, "ui-automations.png", sorted(a for a in automations if a in body))
            browser.close()
    return 0


def yaml_automation_names(project_file: Path = ROOT / "prefect.yaml") -> list[str]:
    import yaml

    deployments = (yaml.safe_load(project_file.read_text()) or {}).get("deployments") or []
    return [t["name"] for d in deployments for t in d.get("triggers") or [] if t.get("name")]


def _save(page, name: str, shown: list[str]) -> None:
    png = page.screenshot(full_page=True)
    (ROOT / "docs" / name).write_bytes(with_text_chunk(png, SHOWN_KEY, json.dumps(shown)))
    print(f"docs/{name}: {len(shown)} shown")


if __name__ == "__main__":
    raise SystemExit(main())
