"""The server under hostile and heavy load, on loopback, with the tiny random debug model.

    python bench/server_load.py [--port 18777] [--out bench/results/server_load_cpu.json]

Starts `python -m server` (debug DiT + debug codec, default settings otherwise) and measures
  1. RSS of the server process while 8 clients upload a ~46 MB WAV (4.3 min, 44.1 kHz stereo) at once,
     and what each got back;
  2. how long a body dripped at 1 byte/s is held before the server cuts it (upload_timeout_s);
  3. requests/s and latency at concurrency 64: /continue of a 2 s clip, steps=1.
Results go to stdout and the JSON file; docs/server.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def wav(seconds: float, seed: int = 0, sample_rate: int = 32000, channels: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, np.repeat(x[:, None], channels, 1).astype(np.float32), sample_rate,
             format="WAV", subtype="PCM_16")
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(port: int, weights: Path, trim: bool = True) -> subprocess.Popen:
    from model.codec import DEBUG_CODEC_CONFIG, Codec
    from model.dit import DiT, DiTConfig
    from model.weights import save_pretrained

    codec = Codec.load(DEBUG_CODEC_CONFIG, seed=0)
    codec.save(weights / "codec")
    save_pretrained(DiT(DiTConfig.from_name("debug", codebook_size=codec.codebook_size)),
                    weights / "dit")
    env = dict(os.environ, SNAC_DIT_WEIGHTS=str(weights / "dit"),
               SNAC_DIT_CODEC=str(weights / "codec"), SNAC_DIT_DEVICE="cpu",
               SNAC_DIT_TRIM_MEMORY=str(trim).lower())
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], cwd=ROOT, env=env)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        time.sleep(0.5)
    raise RuntimeError("the server did not get ready")


def big_uploads(url: str, pid: int) -> dict:
    body = wav(260, sample_rate=44100, channels=2)           # 4.3 min CD audio: ~46 MB
    peak, stop = [rss_mb(pid)], threading.Event()
    before = peak[0]

    def sample():
        while not stop.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.05)

    async def one(client):
        t0 = time.perf_counter()
        r = await client.post(f"{url}/continue?steps=1", files={"audio": ("a.wav", body, "audio/wav")})
        return r.status_code, round(time.perf_counter() - t0, 2)

    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(one(client) for _ in range(8)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = asyncio.run(run())
    stop.set()
    sampler.join()
    after = rss_mb(pid)
    # Drained: nothing queued, then a few seconds for the server to hand memory back.
    while httpx.get(f"{url}/ready", timeout=5).json()["queue_depth"]:
        time.sleep(0.1)
    time.sleep(3.0)
    return dict(upload_mb=round(len(body) / 1e6, 1), clients=8, rss_before_mb=round(before),
                rss_peak_mb=round(max(peak)), rss_after_mb=round(after),
                rss_drained_mb=round(rss_mb(pid)),
                statuses=sorted(s for s, _ in results), seconds=[t for _, t in results])


def dripping_body(port: int) -> dict:
    s = socket.create_connection(("127.0.0.1", port))
    head = (f"POST /continue HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: audio/wav\r\nContent-Length: 1000000\r\n\r\n")
    s.sendall(head.encode())
    t0, sent, answer = time.perf_counter(), 0, b""
    s.settimeout(1.0)
    while time.perf_counter() - t0 < 600:
        try:
            s.sendall(b"R")
            sent += 1
        except OSError:
            break
        try:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        except TimeoutError:
            pass
    elapsed = time.perf_counter() - t0
    s.close()
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") if answer else "(closed)"
    return dict(seconds_until_cut=round(elapsed, 1), bytes_sent=sent, answer=status)


def concurrency(url: str, n_requests: int = 256, concurrency: int = 64) -> dict:
    body = wav(2.0)

    async def run():
        sem = asyncio.Semaphore(concurrency)
        out = []

        async def one(client):
            async with sem:
                t0 = time.perf_counter()
                r = await client.post(f"{url}/continue?steps=1&seed=1",
                                      files={"audio": ("a.wav", body, "audio/wav")})
                out.append((r.status_code, time.perf_counter() - t0))

        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(one(client) for _ in range(n_requests)))
            return out, time.perf_counter() - t0

    out, wall = asyncio.run(run())
    ok = sorted(t for s, t in out if s == 200)
    codes: dict[str, int] = {}
    for s, _ in out:
        codes[str(s)] = codes.get(str(s), 0) + 1
    return dict(requests=n_requests, concurrency=concurrency, wall_s=round(wall, 1),
                ok_per_s=round(len(ok) / wall, 2), statuses=codes,
                latency_ok_s=dict(p50=round(ok[len(ok) // 2], 2), p99=round(ok[int(len(ok) * 0.99)], 2))
                if ok else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=18777)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server_load_cpu.json")
    p.add_argument("--only-uploads", action="store_true",
                   help="only the upload burst, with and without returning memory (SNAC_DIT_TRIM_MEMORY)")
    a = p.parse_args()
    if a.only_uploads:
        result = dict(date=time.strftime("%Y-%m-%d"), cpu_count=os.cpu_count(),
                      platform=platform.platform(), model="debug DiT + debug codec (random)")
        for trim in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                proc = start_server(a.port, Path(tmp), trim)
                try:
                    result[f"big_uploads_trim_{str(trim).lower()}"] = r = big_uploads(
                        f"http://127.0.0.1:{a.port}", proc.pid)
                finally:
                    proc.terminate()
                    proc.wait(30)
            print(f"trim={trim}: 8 x {r['upload_mb']} MB uploads: RSS {r['rss_before_mb']} -> "
                  f"peak {r['rss_peak_mb']} MB, {r['rss_after_mb']} when answered, "
                  f"{r['rss_drained_mb']} drained; statuses {r['statuses']}")
        out = a.out.with_name(a.out.stem + "_memory.json")
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
        return
    url = f"http://127.0.0.1:{a.port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(a.port, Path(tmp))
        try:
            result = dict(date=time.strftime("%Y-%m-%d"), cpu_count=os.cpu_count(),
                          platform=platform.platform(), model="debug DiT + debug codec (random)",
                          load_average_before=round(os.getloadavg()[0], 2))
            result["big_uploads"] = r = big_uploads(url, proc.pid)
            print(f"8 x {r['upload_mb']} MB uploads: RSS {r['rss_before_mb']} -> peak "
                  f"{r['rss_peak_mb']} MB (after {r['rss_after_mb']}), statuses {r['statuses']}")
            result["concurrency_64"] = r = concurrency(url)
            print(f"concurrency 64: {r['ok_per_s']} ok req/s, statuses {r['statuses']}, "
                  f"latency {r['latency_ok_s']}")
            result["dripping_body"] = r = dripping_body(a.port)
            print(f"1 byte/s body: cut after {r['seconds_until_cut']} s, answer {r['answer']!r}")
        finally:
            proc.terminate()
            proc.wait(30)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
