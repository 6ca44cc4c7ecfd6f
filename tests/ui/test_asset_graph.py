"""The Dagster UI in a real browser: the webserver on loopback, the asset graph with our assets.

Starts `dagster-webserver` on 127.0.0.1 and a free port, opens the global asset graph in headless
Chromium (Debian's chromium + chromium-driver, which `make test` installs), checks that the
project's Python assets and dbt models are drawn, and saves a screenshot
(EOCAUSAL_UI_SCREENSHOT names where; default: the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WEBSERVER = Path(sys.executable).with_name("dagster-webserver")
# Safety nets against a hung server or browser, not timing assertions.
_START_LIMIT_S = 300
_RENDER_LIMIT_S = 180

PYTHON_ASSETS = ["survey", "image_chips", "image_embeddings", "effect_estimates", "published_warehouse"]
DBT_MODELS = ["stg_survey", "int_units_imaged", "analysis_units", "unit_exclusions", "effect_estimates_latest"]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (`make test` installs them)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            host, port_hex = address.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                found.add(host)
    return found


@pytest.fixture(scope="module")
def webserver(tiny_study, tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "EOCAUSAL_STUDY": str(tiny_study),
           "EOCAUSAL_WORKDIR": str(home / "work"), "DAGSTER_DISABLE_TELEMETRY": "true"}
    log = open(home / "webserver.log", "wb")
    proc = subprocess.Popen([str(WEBSERVER), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _START_LIMIT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"webserver did not start:\n{(home / 'webserver.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "port": port, "home": home}
    os.killpg(proc.pid, 15)
    proc.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1920,1200",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def test_webserver_listens_on_loopback_only(webserver):
    addresses = _listening_addresses(webserver["port"])
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1, and no 0.0.0.0 or :: listener


def _graph_text(browser) -> str:
    """Text drawn inside the graph (asset nodes live in the SVG), not the sidebar's."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('svg foreignObject'))"
        ".map(e => e.textContent).join('\\n')"
    )


def _drawn(name: str, graph_text: str) -> bool:
    """A node label is the asset's name, or (for long names) the UI's 'head…tail' shortening of it;
    a study's assets are keyed under its name, so a label may show the key ('<study> / name')."""
    for label in graph_text.splitlines():
        label = label.strip().rsplit("/", 1)[-1].strip()
        if label == name:
            return True
        head, sep, tail = label.partition("\u2026")
        if sep and head and tail and name.startswith(head) and name.endswith(tail) and len(name) > len(label):
            return True
    return False


def _dismiss_welcome_dialog(browser) -> None:
    from selenium.webdriver.common.by import By

    for button in browser.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
        button.click()


def _expand_all_groups(browser, use_menu: bool) -> None:
    """The global graph opens with its groups collapsed: press "Expand all groups" (Alt+E), or
    pick it from the graph's own settings menu (the gear among the zoom controls)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.execute_script("document.activeElement && document.activeElement.blur()")  # hotkeys skip inputs
    if not use_menu:
        ActionChains(browser).key_down(Keys.ALT).send_keys("e").key_up(Keys.ALT).perform()
        return
    from selenium.common.exceptions import WebDriverException

    graph_left = browser.execute_script("return window.innerWidth") * 0.4
    try:  # the page re-renders as it loads: an element found may be gone by the click
        for button in browser.find_elements(By.CSS_SELECTOR, "button"):
            if "settings" in (button.get_attribute("innerHTML") or "") and button.location["x"] > graph_left:
                button.click()
                break
        for item in browser.find_elements(By.XPATH, "//*[starts-with(normalize-space(), 'Expand all groups')]"):
            if item.is_displayed():
                item.click()
                break
    except WebDriverException:
        pass


def test_asset_graph_shows_the_project_assets_and_dbt_models(webserver, browser, tmp_path):
    browser.get(f"{webserver['url']}/asset-groups")
    wanted = PYTHON_ASSETS + DBT_MODELS
    polls_since_expand, expand_tries = 0, 0
    deadline = time.monotonic() + _RENDER_LIMIT_S
    while True:
        _dismiss_welcome_dialog(browser)
        text = _graph_text(browser)
        missing = [name for name in wanted if not _drawn(name, text)]
        if not missing or time.monotonic() > deadline:
            break
        loaded = "Materialize all" in browser.execute_script("return document.body.innerText")
        if loaded and expand_tries < 4 and (expand_tries == 0 or polls_since_expand >= 5):
            _expand_all_groups(browser, use_menu=expand_tries % 2 == 1)
            expand_tries, polls_since_expand = expand_tries + 1, 0
        polls_since_expand += 1
        time.sleep(1)
    time.sleep(2)  # let the layout settle before the picture (not an assertion)
    screenshot = Path(os.environ.get("EOCAUSAL_UI_SCREENSHOT", tmp_path / "asset_graph.png"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(screenshot))
    print(f"asset graph screenshot: {screenshot}")
    log = (webserver["home"] / "webserver.log").read_text(errors="replace")
    assert not missing, f"not drawn: {missing}; graph text: {text[:800]!r}\nwebserver log:\n{log[-3000:]}"
    assert screenshot.stat().st_size > 10_000
