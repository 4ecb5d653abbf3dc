"""The static page at `/`.

1. Browser-free: the requests the page's script builds (endpoints, the multipart field, every
   parameter input, the headers and stream events it reads) are issued against the real app.
2. Headless Chromium (Debian `chromium` + `chromium-driver`), driven over the W3C WebDriver
   protocol with httpx: pick a file, click, and find a playable result. Skipped when no browser
   is installed.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import subprocess
import time

import httpx
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from server.app import create_app
from server.background import serve_in_background
from server.params import CONTINUE_PARAMS, EXTEND_PARAMS, PARAM_HEADERS
from server.settings import Settings
from tests.conftest import tone

CHUNK = 196_608


@pytest.fixture(scope="module")
def app(debug_weights_dir, debug_codec_dir):
    from model.engine import ContinuationEngine

    engine = ContinuationEngine.load(debug_weights_dir, debug_codec_dir)
    return create_app(Settings(warmup=False, max_wait_ms=1), engine=engine)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "clip.wav"
    sf.write(path, tone(1.5), 32000, subtype="PCM_16")
    return path


# -- 1. the page's API calls, without a browser -------------------------------------------------


def _page_contract(html: str) -> dict:
    """What the script sends and reads, pulled from the page source."""
    endpoints = json.loads(
        re.sub(r"(\w+):", r'"\1":', re.search(r"const ENDPOINTS = (\{[^}]*\})", html).group(1))
    )
    return {
        "endpoints": endpoints,
        "file_field": re.search(r'body\.append\("(\w+)", file', html).group(1),
        "params": re.findall(r'data-param[^>]*name="(\w+)"', html),
        "extend_extra": re.findall(r'request\("extend", \{ (\w+): n, (\w+): "true" \}', html)[0],
        "headers_read": re.findall(r'"(X-[\w-]+)"', html),
        "events": set(re.findall(r'msg\.event === "(\w+)"', html)),
        "fields_read": set(re.findall(r"msg\.(\w+)", html)) - {"event"},
    }


def test_page_is_served_and_its_requests_are_the_api(app, clip_path):
    with TestClient(app) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = _page_contract(r.text)
        assert page["endpoints"] == {"continue": "continue", "extend": "extend"}
        assert set(page["params"]) <= set(CONTINUE_PARAMS)  # no input the API would 422
        assert {"steps", "seed", "include_input"} <= set(page["params"])
        assert set(page["extend_extra"]) <= set(EXTEND_PARAMS)
        assert set(page["headers_read"]) <= set(PARAM_HEADERS)

        # The request doContinue() makes, with the values a user might type in every field.
        form = {
            "steps": "1",
            "temperature": "1.0",
            "top_p": "0.9",
            "guidance": "1",
            "seed": "5",
            "include_input": "true",
        }
        files = {page["file_field"]: ("clip.wav", clip_path.read_bytes(), "audio/wav")}
        r = c.post("/" + page["endpoints"]["continue"], params=form, files=files)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        assert all(h.lower() in r.headers for h in page["headers_read"])
        assert sf.info(io.BytesIO(r.content)).frames == int(1.5 * 32000) + CHUNK

        # The request doExtend() makes, and the stream events it handles.
        extra = dict.fromkeys(page["extend_extra"], "true") | {"chunks": "1"}
        with c.stream(
            "POST", "/" + page["endpoints"]["extend"], params={"steps": "1", **extra}, files=files
        ) as r:
            assert r.status_code == 200
            lines = [json.loads(x) for x in r.iter_lines() if x]
        # What the script reads from each kind of line (and it reads nothing else).
        needs = {
            "chunk": {"index", "audio"},
            "input": {"audio"},
            "done": {"chunks", "seed"},
            "error": {"error", "detail"},
        }
        assert set().union(*needs.values()) == page["fields_read"]
        assert set(needs) == page["events"] | {"chunk"}  # "chunk" is the script's else-branch
        assert [m["event"] for m in lines] == ["chunk", "done"]
        for m in lines:
            assert needs[m["event"]] <= set(m), m.keys()
        wav = base64.b64decode(lines[0]["audio"])
        assert sf.info(io.BytesIO(wav)).frames == CHUNK

        # An error the page shows as "status error: detail".
        r = c.post("/continue", params={"steps": "0"}, files=files)
        assert r.status_code == 422 and {"error", "detail"} == set(r.json())


# -- 2. a real headless browser -----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


class WebDriver:
    """The few W3C WebDriver commands this test needs, over httpx."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C element key

    def __init__(self, driver_url: str):
        self.http = httpx.Client(base_url=driver_url, timeout=60)
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--mute-audio",
                        ],
                    },
                }
            }
        }
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None):
        r = self.http.request(method, path, json=body)
        value = r.json()["value"]
        if r.status_code != 200:
            raise RuntimeError(f"webdriver {path}: {value}")
        return value

    def cmd(self, method, path, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def find(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]

    def type(self, css, text):
        el = self.find(css)
        self.cmd("POST", f"/element/{el}/clear", {})
        self.cmd("POST", f"/element/{el}/value", {"text": text})

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

    def wait_js(self, script, timeout=90.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(script)):
            if time.monotonic() > deadline:
                status = self.js("return document.getElementById('status').textContent")
                raise TimeoutError(f"{script!r} stayed false; page status: {status!r}")
            time.sleep(0.2)
        return value

    def quit(self):
        try:
            self.cmd("DELETE", "")
        finally:
            self.http.close()


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian packages chromium and chromium-driver")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        wd = WebDriver(f"http://127.0.0.1:{port}")
        try:
            yield wd
        finally:
            wd.quit()
    finally:
        proc.terminate()
        proc.wait(10)


def test_browser_uploads_a_file_and_gets_a_playable_result(app, clip_path, browser):
    with serve_in_background(app) as url:
        browser.cmd("POST", "/url", {"url": url + "/"})
        browser.type("#audio", str(clip_path))
        browser.type("input[name=steps]", "1")
        browser.type("input[name=seed]", "9")
        # The chosen file plays as the input.
        browser.wait_js("return document.getElementById('input-audio').readyState >= 1")
        browser.click("#continue-btn")
        duration = browser.wait_js(
            "const a = document.getElementById('result-audio');"
            "return a.readyState >= 1 && a.duration"
        )
        assert abs(duration - CHUNK / 32000) < 0.01
        assert "seed=9" in browser.js("return document.getElementById('ran').textContent")

        # The streamed extension: one playable player per chunk, as they arrive.
        browser.type("#chunks", "2")
        browser.click("#extend-btn")
        durations = browser.wait_js(
            "const els = [...document.querySelectorAll('audio.chunk')];"
            "return els.length === 2 && els.every(a => a.readyState >= 1)"
            " && els.map(a => a.duration)"
        )
        # Seam-exact chaining holds each chunk's last 0.768 s back for the next piece
        # (docs/server.md): pieces of 6.144 - 0.768 s and 6.144 + 0.768 s, 12.288 s in all.
        hold = 24_576 / 32000
        assert abs(durations[0] - (CHUNK / 32000 - hold)) < 0.01, durations
        assert abs(durations[1] - (CHUNK / 32000 + hold)) < 0.01, durations
        assert browser.js("return document.getElementById('status').textContent").startswith("done")

        # An error is shown, not swallowed.
        browser.type("input[name=steps]", "0")
        browser.click("#continue-btn")
        browser.wait_js("return document.getElementById('status').className === 'error'")
        assert "steps" in browser.js("return document.getElementById('status').textContent")
