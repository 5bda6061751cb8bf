"""A headless Chromium driven by Selenium, for the playground's browser tests
(test_playground.py) and its screenshots (scripts/playground_screenshots.py).

The browser is Debian's `chromium` with its `chromium-driver` (`.ci/ensure-browser` installs both;
`make test` runs it): the driver comes from the same source package as the browser, so their
versions always match, and Selenium never downloads anything (both paths are given to it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser")
DRIVER = "chromedriver"


def _find(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and Path("/usr/bin", name).exists():
        found = str(Path("/usr/bin", name))
    return found


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, or None when either is missing."""
    browser = next((path for name in BROWSERS if (path := _find(name))), None)
    driver = _find(DRIVER)
    return (browser, driver) if browser and driver else None


def start_chromium(width: int = 1280, height: int = 800, device_scale: float = 1.0):
    """A headless Chromium whose page area is `width` x `height` CSS pixels."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    paths = find_chromium()
    if paths is None:
        raise RuntimeError("chromium and chromedriver not found: run .ci/ensure-browser")
    browser, driver = paths
    options = Options()
    options.binary_location = browser
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-extensions", f"--window-size={width},{height}",
                     f"--force-device-scale-factor={device_scale}", "--lang=en-US"):
        options.add_argument(argument)
    # The console (script errors, CSP violations), read back with chrome.get_log("browser").
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root (containers, CI)
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    # --window-size sets the outer window: make the viewport itself the requested size.
    inner = chrome.execute_script("return [window.innerWidth, window.innerHeight]")
    if inner != [width, height]:
        size = chrome.get_window_size()
        chrome.set_window_size(size["width"] + width - inner[0], size["height"] + height - inner[1])
    return chrome
