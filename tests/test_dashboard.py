"""The dashboard in a real browser: headless Chromium loads the page while a simulation runs,
and the round counter advances and the plots draw."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

import pytest

from atoll.app.dashboard import make_server, page
from atoll.app.dashboard_data import dashboard_state
from atoll.app.simulate import simulate
from tests.conftest import ONE_AT_A_TIME, small_config


def chromium() -> str:
    """Debian's chromium, installed on first use where it is missing."""
    found = shutil.which("chromium")
    if found is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True,
                       capture_output=True, timeout=600)
        found = shutil.which("chromium")
    assert found, "chromium is not installed and apt-get could not install it"
    return found


def dom(browser: str, url: str) -> str:
    """The page's DOM once its script has fetched the state and drawn it."""
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--virtual-time-budget=3000", "--dump-dom", url],
        check=True, capture_output=True, text=True, timeout=120).stdout


def shown_round(html: str) -> int:
    m = re.search(r'<b id="round">(\d+)</b>', html)
    assert m, html[:2000]
    return int(m.group(1))


def points(html: str, canvas: str) -> int:
    m = re.search(rf'<canvas id="{canvas}"[^>]*data-points="(\d+)"', html)
    return int(m.group(1)) if m else 0


@pytest.mark.slow
@ONE_AT_A_TIME
def test_dashboard_follows_a_running_simulation(demo_data, tmp_path):
    browser = chromium()
    body = page().decode()
    assert "://" not in body and "src=" not in body  # no external assets: works offline
    out = tmp_path / "run"
    cfg = small_config(demo_data, ["code", "speeches"], federation={"rounds": 8},
                       eval={"every": 1}, baseline={"kinds": ["data_parallel"]})
    cfg.sites[0].pace_s = 0.25  # slow enough for the page to see rounds go by
    run = threading.Thread(target=simulate, args=(cfg, out), daemon=True)
    run.start()
    server = make_server(out, port=0, refresh_ms=500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        deadline = time.monotonic() + 120
        while not dashboard_state(out)["bytes"] and time.monotonic() < deadline:
            time.sleep(0.2)  # the first round has closed
        first = dom(browser, url)
        while (dashboard_state(out)["status"].get("round", 0) < shown_round(first) + 2
               and time.monotonic() < deadline):
            time.sleep(0.2)
        later = dom(browser, url)
        run.join(timeout=180)
    finally:
        server.shutdown()
    assert shown_round(later) > shown_round(first) >= 1
    assert points(later, "loss") > points(first, "loss") > 0  # curves of both runs, drawn
    assert points(later, "wire") > 0
    assert "<td>code</td>" in later and "<td>speeches</td>" in later
    assert re.search(r'<td class="(training|sending|sent|waiting|idle)">', later)
    assert "data-parallel" in later

    state = dashboard_state(out)  # the finished run, as the page reads it
    assert state["status"]["phase"] == "finished"
    assert {"federation", "baseline:data_parallel"} <= set(state["curves"])
    assert len(state["bytes"]) == 8 and state["bytes"][-1]["dp"] > state["bytes"][-1]["up"]
    assert sorted(s["contributor"] for s in state["shares"]) == ["code", "speeches"]
