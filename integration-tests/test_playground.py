"""The playground (GET /) in a real headless Chromium against the real launcher (bundled model,
--api-key): the key prompt, a streamed answer with its live figures and the status bar, Stop
cancelling the generation on the server, the conversation found again after a reload and its JSON
export, JSON mode, regenerate and edit, pasted tools and the tool call shown, a server error shown
to the user, raw mode's tokens with their logprobs and alternatives, model output rendered as
text (never as HTML), a phone-sized viewport, and a console free of script errors and CSP
violations.

One launcher and one browser tab for the whole module; the tests run in file order and build on
each other (the conversation the first ones write is the one the reload must find). Answers are
short (greedy, a few tokens).
Without chromium and chromedriver these tests skip, except in CI (CI=true), where they fail:
`make test` installs both (.ci/ensure-browser).
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import requests
from browser import find_chromium, start_chromium
from conftest import metric, start_launcher, stop_launcher, wait_idle

KEY = "playground-it-key-5d1e"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOTAL_TOKENS = 1024
DROPPED = 'tgi_request_failure{err="dropped"}'  # counters keep TGI's names, no _total

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def chromium_paths():
    paths = find_chromium()
    if paths is None:
        reason = "chromium and chromedriver not found (.ci/ensure-browser installs them; `make test` runs it)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):  # CI=true (tests/conftest.py: any)
            pytest.fail(f"{reason}: CI must run the browser tests", pytrace=False)
        pytest.skip(reason)
    return paths


@pytest.fixture(scope="module")
def server(chromium_paths):
    server = start_launcher("--api-key", KEY, "--max-total-tokens", str(MAX_TOTAL_TOKENS))
    yield server
    stop_launcher(server)


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def chrome(chromium_paths):
    chrome = start_chromium(1280, 800)
    yield chrome
    chrome.quit()


def wait(chrome, condition, timeout: float = 60, what: str = "condition"):
    """Polls `condition(chrome)` (a JS expression when a string) until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = chrome.execute_script(f"return ({condition});") if isinstance(condition, str) else condition(chrome)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: {condition}")
        time.sleep(0.05)


def js(chrome, script: str, *args):
    return chrome.execute_script(script, *args)


def set_field(chrome, element_id: str, value: str) -> None:
    """Types into a parameter field as a user would (clear, then keys)."""
    field = chrome.find_element("id", element_id)
    field.clear()
    if value:
        field.send_keys(value)


def choose(chrome, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(chrome.find_element("id", element_id)).select_by_value(value)


def send(chrome, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = chrome.find_element("id", "composer-input")
    if len(text) > 200:  # a long paste: set at once (typing it would take seconds)
        js(chrome, "arguments[0].value = arguments[1];", box, text)
        box.send_keys(Keys.END)
    else:
        box.send_keys(text)
    box.send_keys(Keys.ENTER)


def last_answer(chrome) -> dict:
    return js(chrome, """
        const items = document.querySelectorAll('#messages li.msg-assistant');
        const m = items[items.length - 1];
        if (!m) return null;
        const stat = (name) => m.querySelector(`[data-stat=${name}]`)?.textContent ?? null;
        return {pending: m.classList.contains('pending'), text: m.querySelector('.msg-body').textContent,
                error: m.querySelector('.msg-error')?.textContent ?? null, code: m.querySelector('.msg-body code')?.textContent ?? null,
                ttft: stat('ttft'), tps: stat('tps'), prompt: stat('prompt'), completion: stat('completion'),
                finish: stat('finish')};""")


def answer_done(chrome, timeout: float = 90) -> dict:
    wait(chrome, "document.querySelector('#messages li.msg-assistant') !== null"
                 " && !document.querySelector('#messages li.pending')", timeout, "the answer to end")
    return last_answer(chrome)


def open_page(chrome, url: str) -> None:
    chrome.get(f"{url}/")
    wait(chrome, "document.readyState === 'complete' && document.getElementById('st-model').textContent !== '…'",
         30, "the page to load")


def test_key_prompt_then_a_streamed_answer_with_live_figures(chrome, url):
    html = requests.get(f"{url}/", timeout=10)
    assert html.status_code == 200 and "text/html" in html.headers["Content-Type"] and KEY not in html.text
    open_page(chrome, url)
    # /v1/models answers 401 without the key: the page asks for it before the first message.
    wait(chrome, "document.getElementById('key-dialog').open", 20, "the key prompt")
    assert js(chrome, "return document.getElementById('key-reason').textContent") == "This server needs an API key."
    assert js(chrome, "return document.activeElement.id") == "key-input"
    set_field(chrome, "key-input", "wrong-key")
    chrome.find_element("id", "key-submit").click()
    wait(chrome, "document.getElementById('key-dialog').open && document.getElementById('key-reason').textContent"
                 " === 'The server did not accept this API key.'", 20, "the prompt again after a wrong key")
    set_field(chrome, "key-input", KEY)
    chrome.find_element("id", "key-submit").click()
    wait(chrome, "!document.getElementById('key-dialog').open", 20, "the prompt to close")
    assert js(chrome, "return sessionStorage.getItem('pytgi.playground.apiKey')") == KEY
    assert KEY not in js(chrome, "return JSON.stringify(localStorage) + document.documentElement.outerHTML")

    set_field(chrome, "p-temperature", "0")
    set_field(chrome, "p-max-tokens", "24")
    # Every redraw of the answer while it streams: its length and the tokens/s shown then.
    js(chrome, """
        window.seen = [];
        new MutationObserver(() => {
          const m = document.querySelector('#messages li.msg-assistant.pending');
          if (m) window.seen.push([m.querySelector('.msg-body').textContent.length,
                                   m.querySelector('[data-stat=tps]')?.textContent ?? null]);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    send(chrome, "Name three colors.")
    answer = answer_done(chrome)
    assert answer["error"] is None and answer["text"].strip(), answer
    # Streamed: part of the text, with a tokens/s figure, was on screen before the answer ended.
    # (How many redraws there were depends on the machine's load: under contention several
    # chunks can land between two frames.)
    seen = js(chrome, "return window.seen")
    final = js(chrome, "return document.querySelector('#messages li.msg-assistant .msg-body').textContent.length")
    partial = [(length, tps) for length, tps in seen if 0 < length < final]
    assert partial, f"no partial answer was shown while streaming: {seen} (final length {final})"
    assert any(tps and re.fullmatch(r"\d+\.\d tok/s", tps) for _, tps in partial), seen  # live tokens/s
    assert re.fullmatch(r"TTFT \d+ ms", answer["ttft"]), answer
    assert float(answer["tps"].split()[0]) > 0, answer
    prompt, completion = (int(re.search(r"\d+", answer[name]).group()) for name in ("prompt", "completion"))
    assert prompt > 5 and 1 <= completion <= 24, answer  # the usage chunk's counts
    assert answer["finish"] in ("stop", "length"), answer

    # The status bar: the model from /info, the live figures from /metrics.
    info = requests.get(f"{url}/info", timeout=10).json()
    wait(chrome, f"document.getElementById('st-model').textContent === {json.dumps(info['model_id'])}"
                 " && /^\\d+$/.test(document.getElementById('st-batch').textContent)"
                 " && /%$/.test(document.getElementById('st-kv').textContent)"
                 " && /%$/.test(document.getElementById('st-prefix').textContent)", 10, "the status bar")


def test_stop_cancels_the_generation_on_the_server(chrome, url):
    set_field(chrome, "p-max-tokens", "900")
    dropped = metric(url, DROPPED, absent=0)
    send(chrome, "Write a very long story about a dragon and a knight, in ten chapters.")
    wait(chrome, "document.querySelector('#messages li.pending .msg-body')?.textContent.length > 20", 60,
         "the answer to start streaming")
    assert metric(url, "tgi_batch_current_size") == 1  # it is running on the server now
    chrome.find_element("id", "stop").click()
    stopped_at = time.monotonic()
    answer = answer_done(chrome, 10)
    assert answer["finish"] == "stopped" and answer["error"] is None, answer
    wait_idle(url, timeout=10)  # tgi_batch_current_size, the queue and the KV blocks back to 0
    assert time.monotonic() - stopped_at < 10
    assert metric(url, "tgi_batch_current_size") == 0
    assert metric(url, DROPPED, absent=0) == dropped + 1  # the server saw the client leave
    assert int(re.search(r"\d+", answer["completion"]).group()) < 900
    # The stop button is off again and the page can send.
    assert js(chrome, "return document.getElementById('stop').disabled") is True


def test_reload_finds_the_conversation(chrome, url):
    before = js(chrome, "return [...document.querySelectorAll('#messages li.msg')].map(m => m.textContent)")
    assert len(before) == 4  # two questions, two answers
    chrome.refresh()
    open_page(chrome, url)
    after = js(chrome, "return [...document.querySelectorAll('#messages li.msg')].map(m => m.textContent)")
    assert after == before
    assert js(chrome, "return document.querySelectorAll('#conversation-list li').length") == 1
    assert js(chrome, "return document.querySelector('#conversation-list [aria-current=true]').textContent") \
        == "Name three colors."
    assert not js(chrome, "return document.getElementById('key-dialog').open")  # the key lives for the tab
    # Export as JSON: the download's content, caught on its way to the file.
    js(chrome, """
        const create = URL.createObjectURL;
        URL.createObjectURL = (blob) => { window.exported = blob; return create(blob); };
        HTMLAnchorElement.prototype.click = function () { window.exportedName = this.download; };""")
    chrome.find_element("id", "export-chat").click()
    exported = json.loads(chrome.execute_async_script("window.exported.text().then(arguments[0]);"))
    assert js(chrome, "return window.exportedName").endswith(".json")
    [conversation] = exported["conversations"]
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"] * 2
    assert conversation["messages"][0]["content"] == "Name three colors."
    assert conversation["messages"][3]["stats"]["finish_reason"] == "stopped"


def test_json_mode_returns_valid_json(chrome, url):
    chrome.find_element("id", "new-chat").click()
    choose(chrome, "p-format", "json_object")
    set_field(chrome, "p-max-tokens", "160")
    send(chrome, "Describe a cat as a JSON object with a name and a color.")
    answer = answer_done(chrome)
    assert answer["error"] is None and answer["finish"] == "stop", answer
    assert isinstance(json.loads(answer["code"]), dict), answer  # shown as a JSON code block


def test_regenerate_and_edit_a_turn(chrome, url):
    choose(chrome, "p-format", "text")
    set_field(chrome, "p-max-tokens", "8")
    texts = "return [...document.querySelectorAll('#messages li.msg .msg-body')].map(m => m.textContent)"
    chrome.find_element("xpath", "//li[contains(@class, 'msg-assistant')]//button[text()='Regenerate']").click()
    answer = answer_done(chrome)
    assert answer["error"] is None and answer["text"].strip(), answer
    # Regenerated with the parameters now set: at most 8 tokens, as Markdown (no longer JSON mode).
    assert int(re.search(r"\d+", answer["completion"]).group()) <= 8, answer
    assert js(chrome, "return document.querySelector('#messages li.msg-assistant .msg-body').classList.contains('md')")
    assert len(js(chrome, texts)) == 2  # the answer replaced, not appended
    chrome.find_element("xpath", "//li[contains(@class, 'msg-user')]//button[text()='Edit']").click()
    editor = wait(chrome, lambda c: c.find_elements("css selector", ".msg-editor textarea"), 5, "the editor")[0]
    assert js(chrome, "return document.activeElement.tagName") == "TEXTAREA"
    editor.clear()
    editor.send_keys("Say hello.")
    chrome.find_element("xpath", "//form[@class='msg-editor']//button[text()='Save and resend']").click()
    answer = answer_done(chrome)
    assert answer["error"] is None, answer
    bodies = js(chrome, texts)
    assert len(bodies) == 2 and bodies[0] == "Say hello." and bodies[1] == answer["text"]


def test_pasted_tools_and_the_tool_call_shown(chrome, url):
    chrome.find_element("id", "new-chat").click()
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}]
    set_field(chrome, "p-max-tokens", "60")
    js(chrome, "const t = document.getElementById('p-tools'); t.value = arguments[0];"
               " t.dispatchEvent(new Event('input', {bubbles: true}));", json.dumps(tools))  # a paste
    choose(chrome, "p-tool-choice", "required")
    try:
        send(chrome, "What is the weather in Paris?")
        answer = answer_done(chrome, 120)  # the tools' grammar compiles first (seconds)
    finally:
        set_field(chrome, "p-tools", "")
        choose(chrome, "p-tool-choice", "auto")
    assert answer["error"] is None and answer["finish"] == "tool_calls", answer
    name = js(chrome, "return document.querySelector('#messages li.msg-assistant .tool-call-name').textContent")
    assert re.fullmatch(r"Tool call: get_weather \(\S+\)", name), name
    shown = js(chrome, "return document.querySelector('#messages li.msg-assistant .tool-call pre code').textContent")
    arguments = json.loads(shown)  # the arguments, shown as JSON
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str), arguments


def test_a_server_error_is_shown(chrome, url):
    chrome.find_element("id", "new-chat").click()  # the request holds nothing but the long prompt
    set_field(chrome, "p-max-tokens", "16")
    prompt = "hello " * (MAX_TOTAL_TOKENS + 100)
    body = {"model": "tgi", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
    direct = requests.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert direct.status_code in (400, 422), direct.text
    message = direct.json()["error"]["message"]
    send(chrome, prompt)
    answer = answer_done(chrome)
    assert answer["error"] is not None and message in answer["error"], (answer["error"], message)
    wait(chrome, "document.getElementById('announcer').textContent.startsWith('Error: ')", 5,
         "the error to be announced")
    wait_idle(url)


def test_raw_mode_shows_each_token_with_its_logprob_and_alternatives(chrome, url):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    set_field(chrome, "p-max-tokens", "6")
    chrome.find_element("css selector", "input[name=mode][value=raw]").click()
    set_field(chrome, "raw-prompt", "The capital of France is")
    set_field(chrome, "raw-top-n", "3")
    chrome.find_element("id", "raw-generate").click()
    wait(chrome, "document.getElementById('raw-stop').disabled"
                 " && document.querySelector('#raw-stats [data-stat=finish]') !== null", 60, "raw generation")
    tokens = js(chrome, "return [...document.querySelectorAll('#raw-output .token')].map(t => t.textContent)")
    # The same request straight to the server (greedy: the same tokens).
    direct = requests.post(f"{url}/generate", headers=AUTH, timeout=60, json={
        "inputs": "The capital of France is",
        "parameters": {"max_new_tokens": 6, "temperature": 0, "details": True, "top_n_tokens": 3}}).json()
    assert tokens == [token["text"] for token in direct["details"]["tokens"]]
    completion = js(chrome, "return document.querySelector('#raw-stats [data-stat=completion]').textContent")
    assert completion == f"completion {len(tokens)} tok"

    first = chrome.find_element("css selector", "#raw-output .token")
    ActionChains(chrome).move_to_element(first).perform()
    wait(chrome, "!document.getElementById('token-tip').hidden", 5, "the tooltip on hover")
    tip = js(chrome, "return document.getElementById('token-tip').textContent")
    expected = direct["details"]["tokens"][0]
    assert f"id {expected['id']} " in tip, tip
    assert float(re.search(r"logprob (-?[0-9.]+)", tip).group(1)) == pytest.approx(expected["logprob"], abs=2e-3)
    rows = js(chrome, "return [...document.querySelectorAll('#token-tip tr')].slice(1).map(r => r.cells[0].textContent)")
    assert rows == [json.dumps(t["text"], ensure_ascii=False) for t in direct["details"]["top_tokens"][0]]
    # The keyboard reaches the same figures: focus moves token to token with the arrow keys.
    first.send_keys(Keys.ARROW_RIGHT)
    wait(chrome, "document.activeElement.dataset.index === '1'", 5, "the next token focused")
    second = direct["details"]["tokens"][1]
    wait(chrome, f"document.getElementById('token-tip').textContent.includes('id {second['id']} ')", 5,
         "the tooltip of the focused token")
    chrome.find_element("css selector", "input[name=mode][value=chat]").click()


def test_model_output_is_rendered_as_text_never_as_html(chrome, url):
    hostile = ("# Title\n**bold** and *it* and `<b>code</b>`\n\n<img src=x onerror=\"window.pwned=1\">"
               "<script>window.pwned=2</script>\n\n- one\n- [link](javascript:window.pwned=3)\n\n"
               "```html\n<iframe src=\"https://example.com\"></iframe>\n```\n")
    conversation = {"id": "hostile", "title": "", "created": 1, "updated": 4102444800000, "system": "",
                    "messages": [{"role": "user", "content": "<svg onload=window.pwned=4>"},
                                 {"role": "assistant", "content": hostile}]}
    open_page(chrome, url)  # localStorage is the page origin's
    js(chrome, "localStorage.setItem('pytgi.playground.conversations.v1', JSON.stringify("
               "[arguments[0], ...JSON.parse(localStorage.getItem('pytgi.playground.conversations.v1') || '[]')]));",
       conversation)
    open_page(chrome, url)
    rendered = js(chrome, """
        const [user, answer] = document.querySelectorAll('#messages li.msg');
        return {pwned: window.pwned ?? null,
                injected: document.querySelectorAll('#messages img, #messages script, #messages iframe, #messages svg').length,
                links: document.querySelectorAll('#messages a').length,
                user: user.querySelector('.msg-body').textContent, heading: answer.querySelector('h3')?.textContent,
                strong: answer.querySelector('strong')?.textContent, em: answer.querySelector('em')?.textContent,
                inline: answer.querySelector('p code')?.textContent, items: answer.querySelectorAll('li').length,
                block: answer.querySelector('.code-block pre code')?.textContent,
                copy: answer.querySelector('.code-block button.copy')?.textContent, text: answer.textContent};""")
    assert rendered["pwned"] is None and rendered["injected"] == 0 and rendered["links"] == 0, rendered
    assert rendered["user"] == "<svg onload=window.pwned=4>"
    assert (rendered["heading"], rendered["strong"], rendered["em"]) == ("Title", "bold", "it")
    assert rendered["inline"] == "<b>code</b>" and rendered["items"] == 2
    assert rendered["block"] == '<iframe src="https://example.com"></iframe>' and rendered["copy"] == "Copy"
    assert '<img src=x onerror="window.pwned=1">' in rendered["text"]


def test_a_phone_sized_viewport(chrome, url):
    size = chrome.get_window_size()
    inner = js(chrome, "return [window.innerWidth, window.innerHeight]")
    try:
        chrome.set_window_size(size["width"] - inner[0] + 390, size["height"] - inner[1] + 844)
        open_page(chrome, url)
        layout = js(chrome, """
            const visible = (id) => !document.getElementById(id).hidden;
            return {width: window.innerWidth, overflow: document.documentElement.scrollWidth - window.innerWidth,
                    conversations: visible('conversations'), params: visible('params'),
                    composer: document.getElementById('composer-input').getBoundingClientRect().bottom <= window.innerHeight};""")
        assert layout["width"] == 390 and layout["overflow"] <= 0, layout
        assert not layout["conversations"] and not layout["params"] and layout["composer"], layout
        toggle = chrome.find_element("id", "toggle-params")
        toggle.click()
        assert toggle.get_attribute("aria-expanded") == "true" and chrome.find_element("id", "params").is_displayed()
        chrome.find_element("id", "toggle-conversations").click()  # one panel at a time on a phone
        assert not chrome.find_element("id", "params").is_displayed()
        assert chrome.find_element("id", "conversations").is_displayed()
    finally:
        chrome.set_window_size(size["width"], size["height"])


def test_no_script_error_and_no_csp_violation_in_the_console(chrome):
    """Last: everything the module did in this browser, read from its console. The only errors
    allowed are the HTTP statuses the tests provoked (401 before the key, the too-long prompt)."""
    entries = chrome.get_log("browser")
    unexpected = [entry["message"] for entry in entries if entry["level"] in ("SEVERE", "WARNING")
                  and not re.search(r"the server responded with a status of (401|400|422)", entry["message"])]
    assert not unexpected, unexpected
    assert any("status of 401" in entry["message"] for entry in entries)  # the log was read at all
