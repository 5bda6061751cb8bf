"""Screenshots of the browser playground for the README: a short conversation at desktop width
(docs/images/playground-desktop.png, 1280x800) and the same page at phone width
(docs/images/playground-phone.png, 390x844).

    .venv/bin/python scripts/playground_screenshots.py                 # starts the bundled model
    .venv/bin/python scripts/playground_screenshots.py --url http://127.0.0.1:3000 [--api-key KEY]

Needs Debian's chromium and chromium-driver (.ci/ensure-browser installs them). Answers are greedy,
so a rerun against the same model gives the same pictures (the figures aside).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The integration tests' launcher and browser helpers: one way to start each, shared.
sys.path.insert(0, str(ROOT / "integration-tests"))

from browser import start_chromium  # noqa: E402
from conftest import start_launcher, stop_launcher  # noqa: E402

DESKTOP = (1280, 800)
PHONE = (390, 844)
SYSTEM = "You are a concise assistant."
QUESTIONS = ("What is the capital of France?",
             "Write a Python function that reverses a string, with one line of explanation.")


def wait(chrome, expression: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not chrome.execute_script(f"return ({expression});"):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {expression}")
        time.sleep(0.1)


def type_into(chrome, element_id: str, text: str, submit: bool = False) -> None:
    from selenium.webdriver.common.keys import Keys

    field = chrome.find_element("id", element_id)
    field.clear()
    field.send_keys(text)
    if submit:
        field.send_keys(Keys.ENTER)


def converse(chrome, url: str, api_key: str | None) -> None:
    chrome.get(f"{url}/")
    if api_key:  # as if typed into the page's prompt: this tab's sessionStorage
        chrome.execute_script("sessionStorage.setItem('pytgi.playground.apiKey', arguments[0]);", api_key)
        chrome.get(f"{url}/")
    wait(chrome, "document.getElementById('st-model').textContent !== '…'"
                 " && !document.getElementById('key-dialog').open")
    type_into(chrome, "p-temperature", "0")
    type_into(chrome, "p-max-tokens", "160")
    type_into(chrome, "system-prompt", SYSTEM)
    for question in QUESTIONS:
        type_into(chrome, "composer-input", question, submit=True)
        wait(chrome, "document.querySelector('#messages li.msg-assistant') !== null"
                     " && !document.querySelector('#messages li.pending')")
    time.sleep(2.5)  # one more status-bar poll after the last answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start the bundled model)")
    parser.add_argument("--api-key", help="the server's --api-key, if it has one")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = None if args.url else start_launcher()
    url = args.url.rstrip("/") if args.url else server.url
    chrome = start_chromium(*DESKTOP)
    try:
        converse(chrome, url, args.api_key)
        desktop = args.out / "playground-desktop.png"
        chrome.save_screenshot(str(desktop))
        size = chrome.get_window_size()
        inner = chrome.execute_script("return [window.innerWidth, window.innerHeight]")
        chrome.set_window_size(size["width"] - inner[0] + PHONE[0], size["height"] - inner[1] + PHONE[1])
        chrome.refresh()  # the page picks its phone layout at load
        wait(chrome, "document.getElementById('st-model').textContent !== '…'")
        time.sleep(2.5)
        phone = args.out / "playground-phone.png"
        chrome.save_screenshot(str(phone))
        print(f"wrote {desktop} and {phone}")
    finally:
        chrome.quit()
        if server is not None:
            stop_launcher(server)


if __name__ == "__main__":
    main()
