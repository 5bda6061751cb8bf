"""The browser playground's server side (router/http/playground.py): GET / serves the packaged page
with a strict Content-Security-Policy, its files come from a fixed list, all of it is public while
POST / (TGI's compat route) still needs the key, and --disable-playground removes the page only.
Also the page's own rules that need no browser: no inline code, no HTML sink for model text, a label
on every control, every file shipped in the package. What the page does in a real browser is
integration-tests/test_playground.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from router.app import create_app
from router.http import playground
from tests.router.app_harness import FakeState, GatedInfer, router_config
from tests.router.helpers import serve_app

KEY = "playground-key-7f3a9c"
ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = sorted(name for name, kind in playground.ASSETS.items() if kind == "text/javascript")
COMPAT_BODY = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}


def serve(router_tokenizer, scenario, **overrides):
    config = router_config(**overrides)
    return serve_app(lambda: create_app(config, FakeState(config, router_tokenizer, GatedInfer(router_tokenizer))),
                     scenario)


class Page(HTMLParser):
    """What the checks below need from index.html."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None], int]] = []  # (tag, attrs, label depth)
        self.script_text = ""
        self.in_script = False
        self.label_depth = 0

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes, self.label_depth))
        if tag == "label":
            self.label_depth += 1
        self.in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "label":
            self.label_depth -= 1
        if tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.in_script:
            self.script_text += data


def parse_page() -> Page:
    page = Page()
    page.feed((playground.ASSETS_DIR / playground.PAGE).read_text(encoding="utf-8"))
    return page


def test_page_and_files_are_public_with_a_strict_csp_and_no_key_in_them(router_tokenizer):
    async def scenario(client):
        page = await client.get("/")
        html = await page.text()
        assert page.status == 200 and page.content_type == "text/html", html[:200]
        csp = page.headers["Content-Security-Policy"]
        assert csp == playground.CONTENT_SECURITY_POLICY
        for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
            assert directive in csp
        assert "unsafe" not in csp
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert KEY not in html and html == (playground.ASSETS_DIR / "index.html").read_text(encoding="utf-8")
        assert (await client.head("/")).status == 200
        for name, media_type in playground.ASSETS.items():
            asset = await client.get(f"/playground/{name}")
            assert asset.status == 200 and asset.content_type == media_type, name
            assert asset.headers["Content-Security-Policy"] == csp
            assert await asset.read() == (playground.ASSETS_DIR / name).read_bytes()
        # Only the listed files: nothing else of the package is reachable, however spelled (with
        # the key: without it, paths that are not public answer 401 before routing).
        for path in ("/playground/index.html", "/playground/nope.js", "/playground/..%2Fhttp%2Fplayground.py",
                     "/playground/%2e%2e%2f%2e%2e%2fapp.py", "/playground/"):
            missing = await client.get(path, headers={"Authorization": f"Bearer {KEY}"})
            assert missing.status == 404, path
        # The page is public; what it calls is not.
        assert (await client.post("/", json=COMPAT_BODY)).status == 401
        assert (await client.get("/v1/models")).status == 401
        compat = await client.post("/", json=COMPAT_BODY, headers={"Authorization": f"Bearer {KEY}"})
        return compat.status, await compat.json()

    status, body = serve(router_tokenizer, scenario, api_key=KEY)
    assert status == 200 and body == [{"generated_text": "xxx"}]  # POST / is still TGI's compat route


def test_disable_playground_removes_the_page_and_keeps_the_compat_route(router_tokenizer):
    async def scenario(client):
        page = await client.get("/")
        asset = await client.get("/playground/app.js")
        compat = await client.post("/", json=COMPAT_BODY)
        return (page.status, page.headers.get("Allow"), await page.json(), asset.status, compat.status,
                await compat.json())

    page_status, allow, page_body, asset_status, compat_status, compat_body = serve(
        router_tokenizer, scenario, disable_playground=True)
    # What TGI answers to GET / (it has POST / only): 405, in TGI's envelope; the files are gone.
    assert (page_status, allow, asset_status) == (405, "POST", 404)
    assert page_body == {"error": "Method GET is not allowed for /.", "error_type": "method_not_allowed"}
    assert compat_status == 200 and compat_body == [{"generated_text": "xxx"}]


def test_the_flag_and_its_env_var_reach_the_router(monkeypatch):
    from router.cli import main as router_main

    assert router_main.make_context("r", []).params["disable_playground"] is False
    assert router_main.make_context("r", ["--disable-playground"]).params["disable_playground"] is True
    monkeypatch.setenv("DISABLE_PLAYGROUND", "true")
    assert router_main.make_context("r", []).params["disable_playground"] is True


def test_the_page_has_no_inline_code_and_loads_only_its_own_files():
    page = parse_page()
    assert page.script_text.strip() == ""
    loaded = []
    for tag, attrs, _ in page.elements:
        assert tag != "style", "inline <style>: the CSP forbids it"
        for name, value in attrs.items():
            assert not name.startswith("on"), f"inline handler {name}= on <{tag}>"
            assert name != "style", f"inline style on <{tag}>"
            if name in ("src", "href") and not (value or "").startswith("#"):
                loaded.append(value)
        if tag == "script":
            assert attrs.get("type") == "module" and attrs.get("src"), attrs
    assert loaded, "the page loads its files"
    for url in loaded:
        # Relative, under the page's folder: works offline and behind a path prefix.
        assert re.fullmatch(r"playground/[a-z]+\.[a-z]+", url), url
        assert url.removeprefix("playground/") in playground.ASSETS, url


def test_every_file_is_listed_and_every_module_import_is_served():
    on_disk = {path.name for path in playground.ASSETS_DIR.iterdir()}
    assert on_disk == {playground.PAGE, *playground.ASSETS}
    imported = set()
    for name in SCRIPTS:
        source = (playground.ASSETS_DIR / name).read_text(encoding="utf-8")
        for specifier in re.findall(r"^import .* from \"([^\"]+)\";$", source, re.M):
            assert specifier.startswith("./"), (name, specifier)  # relative: no CDN, no bare specifier
            imported.add(specifier.removeprefix("./"))
        assert "http://" not in source and "https://" not in source, name
    assert imported and imported <= set(playground.ASSETS)
    assert set(SCRIPTS) - imported == {"app.js"}  # every module is used; app.js is the entry point


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_script_hands_text_to_the_html_parser(name):
    """Model output is untrusted: text reaches the page as Text nodes and textContent only."""
    source = (playground.ASSETS_DIR / name).read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "DOMParser", "srcdoc", "setAttribute(\"style\"", ".cssText"):
        assert sink not in source, f"{name} uses {sink}"


def test_every_control_has_a_label():
    page = parse_page()
    labelled = {attrs.get("for") for tag, attrs, _ in page.elements if tag == "label"}
    controls = [(tag, attrs, depth) for tag, attrs, depth in page.elements if tag in ("input", "select", "textarea")]
    assert len(controls) >= 15
    for tag, attrs, depth in controls:
        assert depth > 0 or attrs.get("id") in labelled, f"<{tag} {attrs}> has no label"
    for tag, attrs, _ in page.elements:
        if tag == "button":
            assert attrs.get("type") in ("button", "submit", "reset"), attrs  # no accidental submits


def test_the_package_ships_every_file():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["router"]
    router_dir = ROOT / "router"
    for path in playground.ASSETS_DIR.iterdir():
        relative = path.relative_to(router_dir).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
