"""Screenshot of a study report's first screen (or the whole page) in headless Chromium.

    .venv/bin/python tests/ui/report_screenshot.py REPORT.html shot.png [--full] [--width 1280 --height 900]

Uses Debian's chromium and chromium-driver (`make browser` installs them), as tests/test_report.py does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def screenshot(html_path: Path, out: Path, width: int = 1280, height: int = 900, full: bool = False) -> Path:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--no-first-run", "--hide-scrollbars",
                     f"--window-size={width},{height}", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.get(Path(html_path).resolve().as_uri())
            deadline = time.monotonic() + 120
            while not driver.execute_script(
                    "return document.readyState == 'complete' && Array.from(document.images).every(i => i.complete)"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{html_path} did not finish loading")
                time.sleep(0.2)
            if full:
                page_height = driver.execute_script("return document.documentElement.scrollHeight")
                driver.set_window_size(width, min(int(page_height) + 40, 16000))
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--full", action="store_true", help="the whole page, not the first screen")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    print(screenshot(args.report, args.out, args.width, args.height, args.full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
