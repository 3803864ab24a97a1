"""Screenshots of the Prefect UI as an operator first meets it: the deployments (named for what they do)
and the automations (named for what they trigger), from `prefect deploy --all` of prefect.yaml on a fresh
local server. Writes docs/ui-deployments.png and docs/ui-automations.png.

    uv run python scripts/ui_screenshots.py      # needs Debian's chromium (scripts/bootstrap installs it)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
            for path, out in (("/deployments", "ui-deployments.png"), ("/automations", "ui-automations.png")):
                page.goto(ui + path)
                page.wait_for_load_state("networkidle")
                page.wait_for_timeout(1500)
                page.screenshot(path=str(ROOT / "docs" / out), full_page=True)
                print(f"docs/{out}")
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
