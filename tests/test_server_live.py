"""Scheduling and transport behaviour against a live uvicorn on 127.0.0.1 (real engine, CPU):
batching, 429, engine faults, disconnects, streaming timing, 413 while the body streams in.

Where a test needs the engine to be slow, failing or blocked on cue, it wraps the REAL engine
(`Gated`): every call still runs the real model unless the test says otherwise.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import select
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from server.app import create_app
from server.background import serve_in_background
from server.settings import Settings
from tests.conftest import tone

CHUNK = 196_608


@pytest.fixture(scope="module")
def engine(debug_weights_dir, debug_codec_dir):
    from model.engine import ContinuationEngine

    return ContinuationEngine.load(debug_weights_dir, debug_codec_dir)


def wav(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds), 32000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def clip() -> bytes:
    return wav(1.5)


class Gated:
    """The real engine behind a gate: calls wait for `open` and can be told to fail."""

    def __init__(self, engine):
        self._engine = engine
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()  # set when a call reached the engine
        self.batches: list[int] = []
        self.fail_batches = 0
        self.fail_extend_after: int | None = None
        self.chunk_times: list[float] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def continue_batch(self, audios, params, **kw):
        self.entered.set()
        self.open.wait(60)
        self.batches.append(len(audios))
        if self.fail_batches:
            self.fail_batches -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self._engine.continue_batch(audios, params, **kw)

    def extend(self, audio, n_chunks, params=None, **kw):
        chunks = self._engine.extend(audio, n_chunks, params, **kw)
        for i in range(n_chunks):
            if self.fail_extend_after is not None and i >= self.fail_extend_after:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            chunk = next(chunks)
            self.chunk_times.append(time.monotonic())
            yield chunk


def live(engine, **settings):
    settings.setdefault("warmup", False)
    return serve_in_background(create_app(Settings(**settings), engine=engine))


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


def post(c, path, clip, **params):
    return c.post(
        path, params={"steps": "1", **params}, files={"audio": ("a.wav", clip, "audio/wav")}
    )


async def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_concurrent_requests_succeed_and_are_batched(engine):
    gated = Gated(engine)
    # Inputs from 1 s (left-padded to the 12.288 s context) to 14 s (only the tail is used).
    clips = [wav(s) for s in np.linspace(1.0, 14.0, 16)]
    with live(gated, max_batch=8, max_wait_ms=100, max_queue=32) as url:

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=300) as c:
                rs = await asyncio.gather(
                    *[post(c, "/continue", x, seed=i) for i, x in enumerate(clips)]
                )
                return rs, (await c.get("/metrics")).text

        rs, text = asyncio.run(main())
    assert [r.status_code for r in rs] == [200] * 16
    assert all(sf.info(io.BytesIO(r.content)).frames == CHUNK for r in rs)
    assert [r.headers["x-seed"] for r in rs] == [str(i) for i in range(16)]
    assert len({r.content for r in rs}) == 16  # each request kept its own input and seed
    n_batches = metric(text, "snac_dit_batch_size_count")
    assert metric(text, "snac_dit_batch_size_sum") == 16
    assert n_batches < 16 and max(gated.batches) > 1, gated.batches


def test_full_queue_gets_429_and_a_client_that_leaves_is_dropped(engine, clip):
    gated = Gated(engine)
    gated.open.clear()  # the first request holds the engine until the test opens the gate
    with live(gated, max_batch=1, max_wait_ms=0, max_queue=2) as url:

        def metrics():
            return httpx.get(f"{url}/metrics").text

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                running = asyncio.ensure_future(post(c, "/continue", clip))
                await asyncio.to_thread(gated.entered.wait, 30)
                stays = asyncio.ensure_future(post(c, "/continue", clip))
                await wait_until(lambda: "queue_depth 1.0" in metrics())
                leaves = asyncio.ensure_future(post(c, "/continue", clip))
                await wait_until(lambda: "queue_depth 2.0" in metrics())

                refused = await post(c, "/continue", clip)  # the queue holds 2
                start = time.monotonic()
                health = await c.get("/health")  # the loop answers while the engine works
                health_s = time.monotonic() - start

                leaves.cancel()  # closes its connection while its job waits
                await wait_until(lambda: "dropped_total 1.0" in metrics())
                gated.open.set()
                return refused, health, health_s, [await running, await stays]

        refused, health, health_s, done = asyncio.run(main())
        text = metrics()
    assert refused.status_code == 429
    assert refused.json()["error"] == "queue_full" and int(refused.headers["retry-after"]) >= 1
    assert health.status_code == 200 and health_s < 1.0
    assert [r.status_code for r in done] == [200, 200]
    assert gated.batches == [1, 1]  # the client that left never reached the engine
    assert metric(text, "snac_dit_rejected_total") == 1
    assert metric(text, "snac_dit_queue_depth") == 0


def test_engine_fault_fails_only_that_batch_and_the_server_goes_on(engine, clip):
    gated = Gated(engine)
    gated.fail_batches = 1
    with live(gated, max_batch=4, max_wait_ms=300) as url:

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                failed = await asyncio.gather(*[post(c, "/continue", clip) for _ in range(2)])
                after = await post(c, "/continue", clip)
                return failed, after, (await c.get("/metrics")).text, (await c.get("/ready"))

        failed, after, text, ready = asyncio.run(main())
    assert gated.batches[0] == 2  # both requests were in the failing batch
    for r in failed:
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"] == "engine_error"
    assert after.status_code == 200 and sf.info(io.BytesIO(after.content)).frames == CHUNK
    assert metric(text, 'snac_dit_engine_errors_total{kind="continue"}') == 1
    assert ready.status_code == 200


def test_fault_inside_a_stream_goes_out_in_the_stream(engine, clip):
    gated = Gated(engine)
    gated.fail_extend_after = 1
    params = {"chunks": 3, "steps": 1, "stream": "true"}
    with live(gated) as url, httpx.Client(base_url=url, timeout=120) as c:
        with c.stream("POST", "/extend", params=params, files={"audio": ("a.wav", clip)}) as r:
            assert r.status_code == 200
            lines = [json.loads(x) for x in r.iter_lines() if x]
        assert [m["event"] for m in lines] == ["chunk", "error"]
        assert set(lines[1]) == {"event", "error", "detail"} and lines[1]["error"] == "engine_error"
        # A fault before the first chunk is still a plain HTTP error.
        gated.fail_extend_after = 0
        r = c.post("/extend", params=params, files={"audio": ("a.wav", clip)})
        assert r.status_code == 503 and r.json()["error"] == "engine_error"
        assert c.get("/ready").status_code == 200


def test_stream_sends_each_chunk_as_soon_as_it_is_generated(engine, clip):
    gated = Gated(engine)
    params = {"chunks": 2, "steps": 1, "stream": "true"}
    with live(gated) as url, httpx.Client(base_url=url, timeout=120) as c:
        arrivals = []
        with c.stream("POST", "/extend", params=params, files={"audio": ("a.wav", clip)}) as r:
            for line in r.iter_lines():
                if line:
                    arrivals.append((json.loads(line)["event"], time.monotonic()))
    assert [e for e, _ in arrivals] == ["chunk", "chunk", "done"]
    assert len(gated.chunk_times) == 2
    # Chunk 0 reached the client before the engine had finished chunk 1.
    assert arrivals[0][1] < gated.chunk_times[1], (arrivals, gated.chunk_times)


def test_stream_client_leaving_stops_the_chain(engine, clip):
    gated = Gated(engine)
    params = {"chunks": 6, "steps": 1, "stream": "true"}
    with live(gated) as url, httpx.Client(base_url=url, timeout=120) as c:
        with c.stream("POST", "/extend", params=params, files={"audio": ("a.wav", clip)}) as r:
            next(r.iter_lines())  # one chunk, then hang up
        deadline = time.monotonic() + 60
        while "dropped_total 1.0" not in c.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The chunk in flight when the client left may still finish; nothing after it starts:
        # the count settles (unchanged for 1.5 s) at most one past what was sent.
        produced = -1
        while produced != len(gated.chunk_times):
            assert time.monotonic() < deadline
            produced = len(gated.chunk_times)
            time.sleep(1.5)
        assert produced <= 2
        assert metric(c.get("/metrics").text, "snac_dit_queue_depth") == 0


def _raw_request(url: str, head: bytes) -> socket.socket:
    u = urlparse(url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    s.sendall(head)
    return s


def _read_reply(s: socket.socket) -> tuple[bytes, bytes]:
    """(status line + headers, body) of one HTTP/1.1 reply with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536) or b""
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        more = s.recv(65536)
        if not more:
            break
        body += more
    return head, body


def test_413_from_content_length_before_the_body_is_sent(engine):
    with live(engine, max_upload_mb=1) as url:
        s = _raw_request(
            url,
            b"POST /continue HTTP/1.1\r\nHost: t\r\nContent-Type: audio/wav\r\n"
            b"Content-Length: 104857600\r\n\r\n",
        )
        head, body = _read_reply(s)  # answered without a single body byte sent
        s.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"] == "payload_too_large"


def test_413_while_a_chunked_body_streams_in(engine):
    mb = b"\0" * 2**20
    with live(engine, max_upload_mb=2) as url:
        s = _raw_request(
            url,
            b"POST /continue HTTP/1.1\r\nHost: t\r\nContent-Type: audio/wav\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
        )
        sent = 0
        for _ in range(64):  # would be 64 MB; the server must answer long before
            try:
                s.sendall(b"%x\r\n" % len(mb) + mb + b"\r\n")
            except OSError:  # the server stopped reading (or closed) after answering
                break
            sent += 1
            if select.select([s], [], [], 0.05)[0]:  # a reply is waiting
                break
        head, body = _read_reply(s)
        s.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"] == "payload_too_large"
    # Loopback socket buffers hold a few MB the server never reads; 64 MB would mean buffering.
    assert sent <= 16, f"{sent} MB went out before the server refused a body over 2 MB"
