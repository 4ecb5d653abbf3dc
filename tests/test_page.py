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
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from server.app import create_app
from server.background import serve_in_background
from server.params import (
    CONTINUE_PARAMS,
    EXTEND_PARAMS,
    INPAINT_PARAMS,
    LOOP_PARAMS,
    PARAM_HEADERS,
    SAMPLING_FIELDS,
    VARY_PARAMS,
)
from server.settings import Settings
from tests.conftest import tone

CHUNK = 196_608


@pytest.fixture(scope="module")
def app(debug_codec_dir):
    from tests.test_editing import make_engine  # a random debug model trained-for-editing shape

    engine = make_engine(debug_codec_dir, after=1)
    return create_app(Settings(warmup=False, max_wait_ms=1, max_chunks=4), engine=engine)


SECONDS = 14.0  # long enough for every action: loop and vary need a whole 6.144 s chunk


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("page") / "clip.wav"
    sf.write(path, tone(SECONDS), 32000, subtype="PCM_16")
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
        "extend_extra": re.findall(r'request\("extend", \{ (\w+): n, (\w+): "true", (\w+): "true" \}',
                                   html)[0],
        # one-shot actions: simple("endpoint", {literal extra} or extra, ...)
        "simple": {name: (re.search(r"extra = \{([^}]*)\}", html).group(1) + ", start: extra.start"
                          if var else body)
                   for name, body, var in re.findall(r'simple\("(\w+)", (?:(\{[^}]*\})|(extra))',
                                                     html)},
        "headers_read": re.findall(r'"(X-[\w-]+)"', html),
        # where each one-shot result's generated part lies: the headers MARKS reads per action
        "marks": {name: set(re.findall(r'"(X-[\w-]+)"', body))
                  for name, body in re.findall(r"(\w+): \(h[^)]*\) => (\[.*?\]),\n", html)},
        "events": set(re.findall(r'msg\.event === "(\w+)"', html)),
        "fields_read": set(re.findall(r"msg\.(\w+)", html)) - {"event"},
    }


def test_page_is_served_and_its_requests_are_the_api(app, clip_path):
    with TestClient(app) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page, html_text = _page_contract(r.text), r.text
        assert page["endpoints"] == {"continue": "continue", "extend": "extend",
                                     "inpaint": "inpaint", "loop": "loop", "vary": "vary",
                                     "info": "info", "analyze": "analyze"}
        assert set(page["params"]) <= set(SAMPLING_FIELDS)  # no input the API would 422
        assert {"steps", "seed", "gumbel", "confidence"} <= set(page["params"])
        assert set(page["extend_extra"]) <= set(EXTEND_PARAMS)
        assert set(page["marks"]) == {"continue", "inpaint", "loop", "vary"}
        assert set(page["headers_read"]) <= (set(PARAM_HEADERS) | {"X-Sample-Rate"}
                                             | set().union(*page["marks"].values()))
        # Each one-shot action's own parameters belong to its endpoint.
        allowed = {"continue": CONTINUE_PARAMS, "inpaint": INPAINT_PARAMS, "loop": LOOP_PARAMS,
                   "vary": VARY_PARAMS}
        assert set(page["simple"]) == set(allowed)
        for action, body in page["simple"].items():
            names = set(re.findall(r"(\w+):", body))
            assert names <= set(allowed[action]), (action, names)
        assert "extra.start" in r.text and set(VARY_PARAMS) >= {"start", "keep"}
        # /info: what the page reads to show limits and enable the editing buttons.
        info = c.get("/" + page["endpoints"]["info"]).json()
        assert {"max_chunks", "max_steps"} <= set(info["limits"])
        assert {"context_seconds", "chunk_seconds"} <= set(info["engine"]["geometry"])
        assert info["engine"]["editing"] == {"inpaint": True, "loop": True, "vary": True}

        # The requests the buttons make, with the values a user might type in every field.
        form = {"steps": "1", "temperature": "1.0", "top_p": "0.9", "guidance": "1",
                "gumbel": "0.5", "confidence": "sampled", "seed": "5"}
        files = {page["file_field"]: ("clip.wav", clip_path.read_bytes(), "audio/wav")}
        n = int(SECONDS * 32000)
        for action, extra, frames in (
            ("continue", {"include_input": "true"}, n + CHUNK),
            ("inpaint", {"start": "3.000", "end": "4.500"}, n),
            ("loop", {}, n + CHUNK),
            ("vary", {"keep": "AB", "start": "2.000"}, n),
        ):
            r = c.post("/" + page["endpoints"][action], params=form | extra, files=files)
            assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", r.text
            wanted = set(PARAM_HEADERS) | {"X-Sample-Rate"} | page["marks"][action]
            assert all(h.lower() in r.headers for h in wanted), (action, wanted - set(r.headers))
            assert sf.info(io.BytesIO(r.content)).frames == frames

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
        assert [m["event"] for m in lines] == ["input", "chunk", "done"]
        for m in lines:
            assert needs[m["event"]] <= set(m), m.keys()
        wav = base64.b64decode(lines[1]["audio"])
        assert sf.info(io.BytesIO(wav)).frames == CHUNK

        # analyzeInput(): the upload as it is; a clip without a beat is the 422 it names.
        r = c.post("/" + page["endpoints"]["analyze"], files=files)
        assert r.status_code == 422 and r.json()["error"] == "no_steady_beat"
        assert '"no_steady_beat"' in html_text and "g.tempo" in html_text

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
                            "--autoplay-policy=no-user-gesture-required",
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
                status = self.js("return document.getElementById('status')?.textContent")
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


def _duration(browser, css: str) -> float:
    return browser.wait_js(f"const a = document.querySelector('{css}');"
                           "return a && a.readyState >= 1 && a.duration")


def _run(browser, button: str) -> None:
    browser.click(button)
    browser.wait_js("return document.getElementById('status').textContent.startsWith('done')"
                    " || document.getElementById('status').className === 'error'")
    status = browser.js("return document.getElementById('status').textContent")
    assert status.startswith("done"), status


def test_browser_a_musicians_session(app, clip_path, browser, tmp_path):
    """Upload, see the waveform, drag a selection, and run every action through the real
    server; each result plays as one track and downloads; cancel and errors show."""
    seconds, chunk = SECONDS, CHUNK / 32000
    with serve_in_background(app) as url:
        browser.cmd("POST", "/window/rect", {"width": 1000, "height": 1700})
        browser.cmd("POST", "/url", {"url": url + "/"})
        browser.wait_js("return document.getElementById('max-chunks').textContent.includes('4')")
        browser.type("#audio", str(clip_path))
        browser.type("input[name=steps]", "1")
        browser.type("input[name=seed]", "9")
        browser.wait_js("return document.getElementById('input-audio').readyState >= 1")
        # The waveform is drawn: dark pixels in the middle row of the canvas.
        browser.wait_js("const c = document.getElementById('wave');"
                        "const d = c.getContext('2d').getImageData(0, c.height / 2, c.width, 1).data;"
                        "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 100) n++;"
                        "return n > c.width / 2")
        # Drag across the middle fifth of the waveform: that is the selection.
        wave = browser.find("#wave")
        width = browser.js("return document.getElementById('wave').getBoundingClientRect().width")
        move = lambda x: {"type": "pointerMove", "duration": 50,  # noqa: E731
                          "origin": {browser.ELEMENT: wave}, "x": int(x), "y": 0}
        browser.cmd("POST", "/actions", {"actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [move(-0.1 * width), {"type": "pointerDown", "button": 0},
                        move(0.1 * width), {"type": "pointerUp", "button": 0}]}]})
        start = float(browser.js("return document.getElementById('sel-start').value"))
        end = float(browser.js("return document.getElementById('sel-end').value"))
        assert abs(start - 0.4 * seconds) < 0.3 and abs(end - 0.6 * seconds) < 0.3, (start, end)

        _run(browser, "#inpaint-btn")
        assert abs(_duration(browser, "#result-audio") - seconds) < 0.01
        # The result's waveform marks what was generated: the span (and its 64 ms crossfades).
        assert _green_share(browser, (start + 0.1) / seconds, (end - 0.1) / seconds) > 0.95
        assert _green_share(browser, 0.01, (start - 0.2) / seconds) == 0
        assert _green_share(browser, (end + 0.2) / seconds, 0.99) == 0
        assert "seed=9" in browser.js("return document.getElementById('ran').textContent")
        assert browser.js("return document.getElementById('download').download") == "inpainted.wav"
        size = browser.wait_js("return fetch(document.getElementById('download').href)"
                               ".then(r => r.arrayBuffer()).then(b => b.byteLength)")
        assert size == 44 + 2 * int(seconds * 32000)

        _run(browser, "#continue-btn")
        assert abs(_duration(browser, "#result-audio") - (seconds + chunk)) < 0.01

        _run(browser, "#loop-btn")
        assert abs(_duration(browser, "#result-audio") - (seconds + chunk)) < 0.01
        total = seconds + chunk  # the bridge after the input is what was generated
        assert _green_share(browser, seconds / total + 0.01, 0.99) > 0.95
        assert _green_share(browser, 0.01, seconds / total - 0.01) == 0
        assert browser.js("return document.getElementById('result-audio').loop") is True

        browser.js("document.getElementById('keep').value = 'AB'")
        _run(browser, "#vary-btn")
        assert abs(_duration(browser, "#result-audio") - seconds) < 0.01
        s0 = int(start * 32000) // 12288 * 12288 / 32000  # the varied chunk, on the 0.384 s grid
        assert _green_share(browser, (s0 + 0.1) / seconds, (s0 + chunk - 0.1) / seconds) > 0.95
        assert _green_share(browser, 0.01, (s0 - 0.1) / seconds) == 0

        # The streamed extension: a player per chunk as they arrive, then one joined track.
        browser.type("#chunks", "2")
        _run(browser, "#extend-btn")
        durations = browser.wait_js(
            "const els = [...document.querySelectorAll('audio.chunk')];"
            "return els.length === 2 && els.every(a => a.readyState >= 1)"
            " && els.map(a => a.duration)"
        )
        # Seam-exact chaining holds each chunk's last 0.768 s back for the next piece
        # (docs/server.md): pieces of 6.144 - 0.768 s and 6.144 + 0.768 s, 12.288 s in all.
        hold = 24_576 / 32000
        assert abs(durations[0] - (chunk - hold)) < 0.01, durations
        assert abs(durations[1] - (chunk + hold)) < 0.01, durations
        assert abs(_duration(browser, "#result-audio") - (seconds + 2 * chunk)) < 0.01
        total = seconds + 2 * chunk
        assert _green_share(browser, seconds / total + 0.01, 0.99) > 0.95
        assert _green_share(browser, 0.01, seconds / total - 0.01) == 0
        assert "2 of 2 chunks" in browser.js("return document.getElementById('status').textContent")

        # (The screenshots for the docs come from test_browser_the_page_as_an_instrument.)
        _shot(browser, tmp_path, "extended")

        # Cancel a long extension: the page says so and is usable again.
        browser.type("#chunks", "4")
        browser.click("#extend-btn")
        browser.click("#cancel-btn")
        browser.wait_js("return document.getElementById('status').textContent === 'cancelled'")
        assert browser.js("return document.getElementById('continue-btn').disabled") is False

        # An error is shown, not swallowed.
        browser.type("input[name=steps]", "0")
        browser.click("#continue-btn")
        browser.wait_js("return document.getElementById('status').className === 'error'")
        assert "steps" in browser.js("return document.getElementById('status').textContent")


def test_browser_api_docs_render_every_operation(app, browser):
    """/docs is a Swagger UI that reads the OpenAPI 3.1 document FastAPI emits (the 4.x one
    said "Unable to render this definition"), lists every operation, and loads nothing from
    outside this server."""
    with serve_in_background(app) as url:
        spec = httpx.get(url + "/openapi.json", timeout=30).json()
        assert spec["openapi"].startswith("3.1")
        expected = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
        assert {("POST", "/continue"), ("POST", "/extend"), ("POST", "/inpaint"),
                ("POST", "/loop"), ("POST", "/vary"), ("GET", "/info")} <= expected
        browser.cmd("POST", "/url", {"url": url + "/docs"})
        # Rendered: its operations are listed, or it says why not (the 4.x "version-pragma").
        browser.wait_js("return document.querySelector('.opblock-summary, .version-pragma')",
                        timeout=60)
        refusal = browser.js("const e = document.querySelector('.version-pragma');"
                             "return e && e.textContent")
        assert refusal is None, refusal
        shown = browser.js(
            "return [...document.querySelectorAll('.opblock-summary')].map(o => ["
            " o.querySelector('.opblock-summary-method').textContent.trim(),"
            " o.querySelector('.opblock-summary-path').dataset.path])"
        )
        assert {tuple(op) for op in shown} == expected
        assert "3.1" in browser.js("return document.querySelector('.info .version-stamp, "
                                   ".info').textContent")
        resources = browser.js(
            "return performance.getEntriesByType('resource').map(r => r.name)")
        assert resources and all(r.startswith(url) for r in resources), resources


def _shot(browser, folder: Path, name: str) -> None:
    png = base64.b64decode(browser.cmd("GET", "/screenshot"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    (folder / f"page-{name}.png").write_bytes(png)


def _in_view(browser, css: str) -> bool:
    return browser.js(f"const r = document.querySelector('{css}').getBoundingClientRect();"
                      "return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight")


def _green_share(browser, x0: float, x1: float) -> float:
    """The share of the result waveform's columns in [x0, x1) (fractions of its width) that show
    the 'generated' green behind the wave."""
    return browser.js(
        "const c = document.getElementById('result-wave'), g = c.getContext('2d');"
        f"const a = Math.floor({x0} * c.width), b = Math.floor({x1} * c.width), w = b - a;"
        "const d = g.getImageData(a, 0, w, c.height).data, hit = new Set();"
        "for (let i = 0; i < d.length; i += 4)"
        "  if (d[i] === 0xc8 && d[i + 1] === 0xef && d[i + 2] === 0xc8) hit.add((i / 4) % w);"
        "return hit.size / w")


def test_browser_the_page_as_an_instrument(app, clip_path, browser, tmp_path):
    """At 1400x1000: status in sight, buttons that cannot work say why, the server's defaults
    shown, the result drawn with its generated part marked (and as a spectrogram), chained
    edits with undo, space to play, a favicon. Screenshots of each state go to
    $SNAC_DIT_PAGE_SCREENSHOTS (docs/images when refreshing the docs), else tmp_path."""
    shots = Path(os.environ.get("SNAC_DIT_PAGE_SCREENSHOTS") or tmp_path)
    short = tmp_path / "short.wav"
    sf.write(short, tone(3.0), 32000, subtype="PCM_16")
    with serve_in_background(app) as url:
        browser.cmd("POST", "/window/rect", {"width": 1400, "height": 1000})
        browser.cmd("POST", "/url", {"url": url + "/"})
        browser.wait_js("return document.getElementById('max-chunks').textContent.includes('4')")
        # The server's defaults are what the empty fields show (top_p 0.95, not a guess of 1.0).
        info = httpx.get(url + "/info", timeout=30).json()["defaults"]
        for name in ("steps", "top_p", "temperature", "guidance", "gumbel"):
            v = info[name]
            want = str(v[0]) if len(set(v)) == 1 else ",".join(map(str, v))
            got = browser.js(f"return document.querySelector('input[name={name}]').placeholder")
            assert float(got.split(",")[0]) == float(want.split(",")[0]) and got.count(",") == \
                want.count(","), (name, got, want)
        assert "no recognisable notes" in browser.js(
            "return document.getElementById('model-note').textContent")
        # Nothing picked: every action is off, and the page says why.
        assert browser.js("return document.getElementById('continue-btn').disabled") is True
        assert "pick an audio file first" in browser.js("return document.getElementById('why').textContent")
        favicon = browser.wait_js("return fetch(document.querySelector('link[rel=icon]').href)"
                                  ".then(r => r.ok && r.headers.get('content-type'))")
        assert favicon.startswith("image/svg+xml")
        _shot(browser, shots, "empty")

        # A 3 s clip: continue works, loop / vary / inpaint need a whole chunk and say so.
        browser.type("#audio", str(short))
        browser.wait_js("return document.getElementById('input-audio').readyState >= 1")
        browser.wait_js("return !document.getElementById('continue-btn').disabled")
        for button in ("#loop-btn", "#vary-btn", "#inpaint-btn"):
            assert browser.js(f"return document.querySelector('{button}').disabled") is True
            assert "6.144 s" in browser.js(f"return document.querySelector('{button}').title")
        why = browser.js("return document.getElementById('why').textContent")
        assert "Inpaint, Loop, Vary: needs at least 6.144 s of audio" in why and "3.00 s" in why
        _shot(browser, shots, "short-clip")

        # A long clip: continue; status in sight while working and when done.
        browser.type("#audio", str(clip_path))
        browser.type("input[name=steps]", "1")
        browser.type("input[name=seed]", "9")
        browser.wait_js("return !document.getElementById('loop-btn').disabled")
        assert "select a span" in browser.js("return document.getElementById('inpaint-btn').title")
        browser.click("#continue-btn")
        assert _in_view(browser, "#status") and browser.js(
            "return document.getElementById('status').textContent").startswith("continuing")
        _shot(browser, shots, "working")
        browser.wait_js("return document.getElementById('status').textContent.startsWith('done')")
        assert _in_view(browser, "#status") and _in_view(browser, "#result-wave")
        # The result is drawn; its last 6.144 s of 20.144 (the continuation) are marked green.
        total = SECONDS + CHUNK / 32000
        assert _green_share(browser, SECONDS / total + 0.01, 0.99) > 0.95
        assert _green_share(browser, 0.01, SECONDS / total - 0.01) == 0
        _shot(browser, shots, "result")
        png = base64.b64decode(browser.cmd("GET", "/screenshot"))
        if os.environ.get("SNAC_DIT_PAGE_SCREENSHOTS"):
            (shots / "page.png").write_bytes(png)  # what README and docs/server.md show
        browser.click("#spectrogram")
        assert browser.js(
            "const c = document.getElementById('result-wave'), g = c.getContext('2d');"
            "const d = g.getImageData(0, 60, c.width, 1).data; const s = new Set();"
            "for (let i = 0; i < d.length; i += 4) s.add(d[i]); return s.size") > 20
        _shot(browser, shots, "spectrogram")
        browser.click("#spectrogram")  # back to the waveform

        # Space plays and pauses the result (the user is not typing).
        browser.js("document.activeElement.blur()")
        browser.cmd("POST", "/actions", {"actions": [{"type": "key", "id": "kb", "actions": [
            {"type": "keyDown", "value": " "}, {"type": "keyUp", "value": " "}]}]})
        browser.wait_js("return !document.getElementById('result-audio').paused")
        browser.cmd("POST", "/actions", {"actions": [{"type": "key", "id": "kb", "actions": [
            {"type": "keyDown", "value": " "}, {"type": "keyUp", "value": " "}]}]})
        browser.wait_js("return document.getElementById('result-audio').paused")

        # Chain: the continuation becomes the input, is inpainted in its new part, then undone.
        browser.click("#use-btn")
        browser.wait_js("return document.getElementById('input-info').textContent.includes("
                        f"'{total:.2f} s')")
        assert "continued-take1.wav" in browser.js("return document.getElementById('audio').files[0].name")
        browser.js("const a = document.getElementById('sel-start'), b = document.getElementById('sel-end');"
                   "a.value = '15'; b.value = '16.5'; b.dispatchEvent(new Event('input'))")
        browser.wait_js("return !document.getElementById('inpaint-btn').disabled")
        _run(browser, "#inpaint-btn")
        assert abs(_duration(browser, "#result-audio") - total) < 0.01
        assert _green_share(browser, 15.2 / total, 16.3 / total) > 0.95
        assert _green_share(browser, 0.01, 14.5 / total) == 0
        browser.click("#undo-btn")
        browser.wait_js("return document.getElementById('input-info').textContent.includes("
                        f"'{SECONDS:.2f} s')")
        assert browser.js("return document.getElementById('undo-btn').disabled") is True

        # An error is in sight, where the user clicked.
        browser.type("input[name=steps]", "0")
        browser.click("#continue-btn")
        browser.wait_js("return document.getElementById('status').className === 'error'")
        assert _in_view(browser, "#status")
        _shot(browser, shots, "error")


def test_browser_beat_grid_tempo_key_and_snapping(app, browser, tmp_path):
    """A click track at 120 BPM in 4/4 (bars of 2 s from 0.5 s): after upload the page shows
    tempo, metre and key, draws the beats and bar numbers over the waveform, snaps a dragged
    selection to the beats (Alt drags freely), and loops by whole bars."""
    from tests.test_analysis import clicks

    seconds = 20.0
    path = tmp_path / "beat.wav"
    sf.write(path, clicks(120, 4, seconds=seconds), 32000, subtype="PCM_16")
    with serve_in_background(app) as url:
        browser.cmd("POST", "/window/rect", {"width": 1400, "height": 1000})
        browser.cmd("POST", "/url", {"url": url + "/"})
        browser.wait_js("return document.getElementById('max-chunks').textContent.includes('4')")
        browser.type("#audio", str(path))
        browser.type("input[name=steps]", "1")
        shown = browser.wait_js("const t = document.getElementById('musical').textContent;"
                                "return t.includes('BPM') && t")
        assert "120.0 BPM" in shown and "4/4" in shown and "bars" in shown, shown
        browser.wait_js("return document.getElementById('input-audio').readyState >= 1")
        # A downbeat line at bar 2 (2.5 s) runs the canvas's full height; between beats, none.
        column = ("const c = document.getElementById('wave'), x = Math.round(T / %s * c.width);"
                  "const d = c.getContext('2d').getImageData(x, 0, 1, 8).data;"
                  "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0) n++; return n")
        assert browser.js(column.replace("T", "2.5") % seconds) >= 6
        assert browser.js(column.replace("T", "2.75") % seconds) == 0

        wave = browser.find("#wave")
        width = browser.js("return document.getElementById('wave').getBoundingClientRect().width")

        def drag(t0: float, t1: float, alt: bool = False) -> tuple[float, float]:
            at = lambda t: {"type": "pointerMove", "duration": 50,  # noqa: E731
                            "origin": {browser.ELEMENT: wave}, "y": 0,
                            "x": int((t / seconds - 0.5) * width)}
            keys = [{"type": "keyDown", "value": "\ue00a"}] if alt else [{"type": "pause"}]
            browser.cmd("POST", "/actions", {"actions": [
                {"type": "key", "id": "kb", "actions": keys + [{"type": "pause"}] * 3
                 + [{"type": "keyUp", "value": "\ue00a"} if alt else {"type": "pause"}]},
                {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                 "actions": [at(t0), {"type": "pointerDown", "button": 0}, at(t1),
                             {"type": "pointerUp", "button": 0}]}]})
            browser.cmd("DELETE", "/actions")
            return (float(browser.js("return document.getElementById('sel-start').value")),
                    float(browser.js("return document.getElementById('sel-end').value")))

        assert drag(2.38, 6.62) == (2.5, 6.5)               # snapped to the beats
        assert "bar 2 beat 1 to bar 4 beat 1" in browser.js(
            "return document.getElementById('sel-bars').textContent")
        start, end = drag(2.38, 6.62, alt=True)             # Alt: where the pointer was
        assert abs(start - 2.38) < 0.05 and abs(end - 6.62) < 0.05, (start, end)

        browser.type("#loop-bars", "8")
        _run(browser, "#loop-btn")
        assert abs(_duration(browser, "#result-audio") - 16.0) < 0.05  # 8 bars of 2 s
        assert "8 bars" in browser.js("return document.getElementById('result-caption').textContent")
        _shot(browser, Path(os.environ.get("SNAC_DIT_PAGE_SCREENSHOTS") or tmp_path), "beat-grid")
