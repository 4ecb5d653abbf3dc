"""Style requests through HTTP (issue 37): a model without style actions answers a clear 422;
one with them takes `action=<k>` or a reference clip in a second file field 'style'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.codec import Codec
from model.dit import DiT, DiTConfig
from model.engine import ContinuationEngine
from server.app import create_app
from server.settings import Settings
from tests.test_page import browser  # noqa: F401 - the page tests' chromium fixture
from tests.test_server import assert_error, post, read_wav, wav_bytes

SR = 32000
FAST = "steps=2,1,1,1&seed=3"


def song(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def make_engine(codec_dir: str, style_actions: int) -> ContinuationEngine:
    torch.manual_seed(0)
    codec = Codec.load(codec_dir)
    dit = DiT(DiTConfig.from_name("debug", codebook_size=codec.codebook_size, max_after_chunks=1,
                                  style_actions=style_actions, style_topk=min(2, style_actions)
                                  or 2))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.05)
    return ContinuationEngine(codec, dit)


@pytest.fixture(scope="module")
def plain(debug_codec_dir):
    app = create_app(Settings(warmup=False, max_wait_ms=1), engine=make_engine(debug_codec_dir, 0))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def styled(debug_codec_dir):
    app = create_app(Settings(warmup=False, max_wait_ms=1), engine=make_engine(debug_codec_dir, 4))
    with TestClient(app) as c:
        yield c


def with_style(client, path, data, ref, query=FAST):
    return client.post(f"{path}?{query}", files={"audio": ("a.wav", data, "audio/wav"),
                                                 "style": ("ref.wav", ref, "audio/wav")})


def test_a_model_without_style_actions_refuses_style_requests_with_a_422(plain):
    data, ref = wav_bytes(song(8.0)), wav_bytes(song(7.0, 440.0))
    info = plain.get("/info").json()["engine"]["style"]
    assert info["available"] is False and info["actions"] == []
    for path, q in (("/continue", ""), ("/extend", "&chunks=2"), ("/inpaint", "&start=2&end=3"),
                    ("/vary", "")):
        assert_error(post(plain, path, data, f"{FAST}&action=0{q}"), 422, "no_style_actions",
                     "no style actions")
        assert_error(with_style(plain, path, data, ref, FAST + q), 422, "no_style_actions")
    # Without a style the same server answers as before; style_scale alone changes nothing.
    assert post(plain, "/continue", data, FAST + "&style_scale=2").status_code == 200
    assert_error(with_style(plain, "/loop", data, ref), 422, "unknown_parameter")


def test_a_model_with_style_actions_takes_an_action_or_a_reference(styled):
    data, ref = wav_bytes(song(8.0)), wav_bytes(song(7.0, 440.0))
    info = styled.get("/info").json()["engine"]["style"]
    assert info["available"] and [a["action"] for a in info["actions"]] == [0, 1, 2, 3]
    base = post(styled, "/continue", data, FAST)
    act = post(styled, "/continue", data, f"{FAST}&action=1&style_scale=2")
    clip = with_style(styled, "/continue", data, ref, f"{FAST}&style_guidance=icg&style_scale=2")
    for r in (base, act, clip):
        assert r.status_code == 200, r.text
    assert act.content != base.content and clip.content != base.content
    assert len(read_wav(act.content)[0]) == len(read_wav(base.content)[0])
    ext = post(styled, "/extend", data, f"{FAST}&action=2&chunks=2")
    assert ext.status_code == 200, ext.text
    assert post(styled, "/vary", data, f"{FAST}&action=3").status_code == 200
    assert_error(post(styled, "/continue", data, f"{FAST}&action=4"), 422)
    assert_error(post(styled, "/continue", data, f"{FAST}&style_guidance=both"), 422)
    assert_error(with_style(styled, "/continue", data, ref, f"{FAST}&action=1"), 422)


def test_client_sends_the_reference_as_a_second_file_and_the_style_fields():
    from clients import endpoints

    req = endpoints.continue_(b"song", None, False, {"style": b"ref", "style_scale": 2.0,
                                                     "style_guidance": "icg"})
    assert req.files["audio"][1] == b"song" and req.files["style"][1] == b"ref"
    assert req.params == {"style_scale": "2.0", "style_guidance": "icg"}
    req = endpoints.extend(b"song", 2, None, False, {"action": 3})
    assert "style" not in req.files and req.params["action"] == "3"


def test_cli_style_flags_reach_the_request(tmp_path):
    from clients import endpoints
    from clients.__main__ import _parser, _sampling

    (tmp_path / "in.wav").write_bytes(b"song")
    (tmp_path / "ref.wav").write_bytes(b"ref")
    args = _parser().parse_args(["continue", str(tmp_path / "in.wav"), "--style",
                                 str(tmp_path / "ref.wav"), "--style-scale", "2",
                                 "--style-guidance", "icg"])
    req = endpoints.continue_(args.input, None, False, _sampling(args))
    assert req.files["style"][1] == b"ref" and req.params["style_guidance"] == "icg"
    args = _parser().parse_args(["extend", str(tmp_path / "in.wav"), "--chunks", "2",
                                 "--action", "1"])
    assert endpoints.extend(args.input, 2, None, False, _sampling(args)).params["action"] == "1"


def test_style_guidance_counts_in_the_compute_budget():
    from model.sampler import SamplingParams
    from server.params import request_passes

    p = SamplingParams(steps=(4, 2, 2, 2), guidance=(2.0, 1.0, 1.0, 1.0), style_scale=2.0)
    assert request_passes(p) == 4 * 2 + 6 == 14          # no style given: no reference rows
    assert request_passes(p, 2, styled=True) == 2 * (4 * 3 + 6 * 2)


def test_browser_page_offers_the_actions_only_when_the_model_has_them(
        debug_codec_dir, browser, tmp_path):  # noqa: F811 - the fixture imported above
    """The page's style controls: hidden for a model without style actions (the shipped demo);
    with them, the K actions as a choice (with their descriptions, and a player for an action's
    example) and a reference clip, sent with continue."""
    import soundfile as sf

    from server.background import serve_in_background
    from tests.test_page import _duration, _run

    clip = tmp_path / "clip.wav"
    sf.write(clip, song(8.0), SR, subtype="PCM_16")
    for k in (0, 4):
        engine, sent = make_engine(debug_codec_dir, k), []
        run = engine.continue_batch

        def recorded(*args, _sent=sent, _run=run, **kw):
            _sent.append(kw.get("styles"))
            return _run(*args, **kw)

        engine.continue_batch = recorded
        if k:   # action 2 has been described and has an example to hear (training.dit.actions)
            engine.action_notes = [dict(action=a, description=f"style {a}") for a in range(k)]
            engine.actions_dir = tmp_path
            (tmp_path / "actions").mkdir()
            sf.write(tmp_path / "actions" / "action-2.ogg", song(6.144), SR, format="OGG",
                     subtype="VORBIS")
        app = create_app(Settings(warmup=False, max_wait_ms=1), engine=engine)
        with serve_in_background(app) as url:
            browser.cmd("POST", "/url", {"url": url + "/"})
            browser.wait_js("return document.getElementById('max-chunks').textContent"
                            ".includes('at most')")  # /info has been read
            hidden = browser.js("return document.getElementById('style-panel').hidden")
            options = browser.js("return document.getElementById('style-action').options.length")
            assert (hidden, options) == ((True, 1) if k == 0 else (False, 1 + k))
            if k:
                browser.type("#audio", str(clip))
                browser.type("input[name=steps]", "1")
                assert "style 1" in browser.js(
                    "return document.getElementById('style-action').options[2].textContent")
                browser.js("const s = document.getElementById('style-action');"
                           "s.value = '2'; s.dispatchEvent(new Event('change'))")
                browser.wait_js("const p = document.getElementById('style-example');"
                                "return !p.hidden && p.readyState >= 1")   # its example plays
                assert _duration(browser, "#style-example") > 6.0
                browser.type("#style-file", str(clip))
                browser.wait_js("return document.getElementById('input-audio').readyState >= 1")
                _run(browser, "#continue-btn")
                assert _duration(browser, "#result-audio") > 6.0
                assert sent[-1][0].reference is not None     # the clip's style went along
                browser.js("document.getElementById('style-file').value = ''")
                _run(browser, "#continue-btn")
                assert sent[-1][0].action == 2               # then the chosen action
