"""Real time on a CPU: what `POST /continue` and each `/extend` piece cost, per phase.

    python bench/realtime.py --threads 2 --isa avx2 --out bench/results/realtime_avx2.jsonl
    python bench/realtime.py --threads 2 --isa avx2 --levers maskless,inplace_snake,int8 --steps 8,6,4,4

The served weights (default the shipped demo DiT and codec), 12.288 s inputs (the two-chunk
context), one request. `continue` is the server's call, `engine.continue_batch([audio],
lead_in=JOIN_SAMPLES)`; `extend` is `engine.extend(audio, N, lead_in=JOIN_SAMPLES)`, timed
piece by piece as /extend streams them (the first piece includes the context encode, which
`extend` runs at the call); `http` is POST /continue through the app (a test client: upload
decode, batcher, engine, WAV out; the server's warm-up first); `http_paired` asks the server's
own engine for the same continuation directly before each request (the HTTP layer's cost, on a
noisy machine); `paired` runs /continue with
each of `--compare`'s lever sets in turn, every repeat, in one process (on a shared machine
the fairest comparison: slow spells hit every set alike); `weights` does the same for the DiTs
of `--compare-weights` (e.g. untrained DiTs of the sizes one could train: sampling costs what
the size and the steps make it, whatever the weights). All include the join
(`heard_context`) and the lead-in. Phases as in bench/latency.py: encode, sample (the DiT),
heard_context (the join's decode and re-encode), decode (the output). Real time = new audio
seconds / wall seconds: 6.144 s per /continue; per /extend piece its own new samples (6.144 s
- 0.768 s first, 6.144 s middle, + 0.768 s last).

`--isa avx2` runs it as an AVX2 machine without AVX-512 would, from any x86 host: the script
re-executes itself with ATen, oneDNN, MKL and fbgemm capped at AVX2 (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, FBGEMM_ENABLE_INSTRUCTIONS); every row records the
capability torch reports, the host's AVX-512 flags and those variables. `--levers` is the fast
path (model/fast.py; "none" = all off); `--decoder DIR` decodes through another codec (its
quantiser and decoder; timing only: a codec not trained with this DiT, e.g. weights/next/codec);
`--time-codec DIR` encodes and decodes through another codec (timing only, likewise: a codec
with its own encoder, such as the spectral one, costs differently on both sides).
Medians over `--repeats` after `--warmup` runs; `--profile` adds one profiled /continue's top
ops. One JSON line per mode to stdout and, with `--out`, appended.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ISA_ENV = {"avx2": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                        MKL_ENABLE_INSTRUCTIONS="AVX2", FBGEMM_ENABLE_INSTRUCTIONS="AVX2")}


def _latency():
    """bench/latency.py (its PhaseClock and run_once), loaded by path like every bench script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_latency",
                                                  Path(__file__).with_name("latency.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cpu_record() -> dict:
    """What the CPU offers and what torch uses of it."""
    import torch

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    field = lambda name: next((ln.split(":", 1)[1].strip() for ln in lines  # noqa: E731
                               if ln.startswith(name)), "")
    flags = set(field("flags").split())
    model = field("model name") or platform.processor()
    return dict(
        model=model, cores=os.cpu_count(), torch_capability=torch.backends.cpu.get_cpu_capability(),
        host_avx2="avx2" in flags, host_avx512=sorted(f for f in flags if f.startswith("avx512")),
        env={k: os.environ.get(k) for k in ISA_ENV["avx2"]},
        load_avg_1min=round(os.getloadavg()[0], 2),  # others' work slows a 2-thread run badly
        quantized_engine=torch.backends.quantized.engine,
    )


def build(args):
    from model.codec import Codec
    from model.engine import ContinuationEngine
    from model.fast import FastPath, apply_fast_path

    engine = ContinuationEngine.load(args.weights, args.codec)
    if args.decoder:  # another codec decodes (its quantiser and decoder), this one encodes:
        engine.codec.decode = Codec.load(args.decoder).decode  # timing only, not music
    if args.time_codec:  # another codec on both sides, the DiT's geometry: timing only
        other = Codec.load(args.time_codec)
        if other.geometry() != engine.codec.geometry():
            raise SystemExit(f"error: {args.time_codec} has another token geometry than "
                             f"{args.codec}; it cannot stand in for it")
        engine.codec.encode, engine.codec.decode = other.encode, other.decode
    try:
        fast = FastPath.from_names(args.levers, args.threads)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return engine, apply_fast_path(engine, fast), fast


def time_continue(engine, audio, params) -> dict:
    return _latency().run_once(engine, [audio], [params])


def time_extend(engine, audio, params, n: int) -> list[dict]:
    """Per piece: seconds per phase and in total, and the piece's new audio seconds."""
    from model.engine import JOIN_SAMPLES

    latency = _latency()
    pieces, clock = [], latency.PhaseClock(engine.device)
    with latency.instrumented(engine, clock):
        t0 = time.perf_counter()
        it = engine.extend(audio, n, params, lead_in=JOIN_SAMPLES)
        for k in range(n):
            piece = next(it)
            t1 = time.perf_counter()
            new = piece.shape[-1] - (JOIN_SAMPLES if k == 0 else 0)
            pieces.append({**clock.seconds, "total": t1 - t0,
                           "audio_s": new / engine.sample_rate})
            clock.seconds = dict.fromkeys(clock.seconds, 0.0)
            t0 = time.perf_counter()
    return pieces


def time_http(args, fast, audio, runs: int, paired: bool = False) -> dict[str, list[float]]:
    """Seconds of `runs` POST /continue calls through the app (upload decode, batcher, engine,
    WAV out), as a client of the running server sees them, after the server's own warm-up.
    `paired`: before each request the same continuation is also asked of the server's own engine
    directly (continue_batch, what the batcher calls, from this thread): the HTTP layer's cost,
    with slow spells hitting both alike."""
    import io

    import soundfile as sf
    from fastapi.testclient import TestClient

    from model.engine import JOIN_SAMPLES
    from server.app import create_app
    from server.settings import Settings

    settings = Settings(weights=args.weights, codec=args.codec, maskless=fast.maskless,
                        inplace_snake=fast.inplace_snake, int8=fast.int8, threads=fast.threads,
                        max_wait_ms=0)
    buf = io.BytesIO()
    sf.write(buf, audio.numpy(), 32000, format="WAV", subtype="PCM_16")
    query = "seed=0" + (f"&steps={args.steps}" if args.steps else "")
    seconds = {"http": [], "engine": []} if paired else {"http": []}
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.service.engine
        steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else None
        params = replace(engine.default_params, seed=0, **({"steps": steps} if steps else {}))
        for _ in range(runs):
            if paired:
                t0 = time.perf_counter()
                engine.continue_batch([audio], [params], lead_in=JOIN_SAMPLES)
                seconds["engine"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = client.post(f"/continue?{query}",
                            files={"audio": ("in.wav", buf.getvalue(), "audio/wav")})
            seconds["http"].append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise SystemExit(f"POST /continue answered {r.status_code}: {r.text}")
    return seconds


def top_ops(engine, audio, params, n: int = 12) -> list[tuple[str, float]]:
    """Where one /continue's time goes: the n ops with the most self CPU seconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_continue(engine, audio, params)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [(e.key, round(e.self_cpu_time_total / 1e6, 3)) for e in ops]


def median_rows(rows: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="weights/demo/dit")
    ap.add_argument("--codec", default="weights/demo/codec")
    ap.add_argument("--decoder", default="", help="decode with this codec's decoder (timing)")
    ap.add_argument("--time-codec", default="",
                    help="encode and decode with this codec (timing; same geometry)")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levers", default="maskless,inplace_snake",
                    help="comma list of maskless, inplace_snake, int8; or none (default: the "
                         "server's defaults)")
    ap.add_argument("--steps", default="", help="per-level steps (default: the model's)")
    ap.add_argument("--modes", default="continue,extend",
                    help="continue, extend, http, http_paired, paired, weights")
    ap.add_argument("--compare", default="none/maskless,inplace_snake/maskless,inplace_snake,int8",
                    help="paired: lever sets, '/'-separated, run in turn every repeat")
    ap.add_argument("--compare-weights", default="",
                    help="--modes weights: DiT directories timed in turn, every repeat (timing "
                         "only when their weights are untrained, e.g. sizes before training)")
    ap.add_argument("--chunks", type=int, default=3, help="/extend chunks")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="also profile one /continue: its top ops by self CPU time")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    want = ISA_ENV.get(args.isa, {})
    if any(os.environ.get(k) != v for k, v in want.items()):  # before torch reads them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **want})
    import torch

    from model.fast import FastPath, apply_fast_path

    torch.manual_seed(0)
    engine, report, fast = build(args)
    audio = torch.randn(engine.context_samples, generator=torch.Generator().manual_seed(0)) * 0.1
    steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else None
    params = replace(engine.default_params, seed=0, **({"steps": steps} if steps else {}))
    rows = []
    for mode in args.modes.split(","):
        if mode == "continue":
            runs = [time_continue(engine, audio, params) for _ in range(args.warmup + args.repeats)]
            med = median_rows(runs[args.warmup:])
            timing = dict(median_s=med, realtime_factor=round(
                engine.chunk_samples / engine.sample_rate / med["total"], 3))
            if args.profile:
                timing["top_ops_s"] = top_ops(engine, audio, params)
        elif mode == "extend":
            runs = [time_extend(engine, audio, params, args.chunks)
                    for _ in range(args.warmup + args.repeats)][args.warmup:]
            pieces = [median_rows([r[k] for r in runs]) for k in range(args.chunks)]
            total = statistics.median(sum(p["total"] for p in r) for r in runs)
            timing = dict(pieces=[{**p, "realtime_factor": round(p["audio_s"] / p["total"], 3)}
                                  for p in pieces], total_s=round(total, 4),
                          realtime_factor=round(args.chunks * engine.chunk_samples
                                                / engine.sample_rate / total, 3))
        elif mode == "paired":  # lever sets interleaved in one process: drift hits all alike
            sets = args.compare.split("/")
            fasts = [FastPath.from_names(names, args.threads) for names in sets]
            runs = {names: [] for names in sets}
            for r in range(args.warmup + args.repeats):
                for names, f in zip(sets, fasts, strict=True):
                    apply_fast_path(engine, f)
                    got = time_continue(engine, audio, params)
                    if r >= args.warmup:
                        runs[names].append(got)
            apply_fast_path(engine, fast)
            timing = dict(compare={names: dict(median_s=median_rows(rows), totals_s=[
                round(x["total"], 3) for x in rows]) for names, rows in runs.items()})
        elif mode == "weights":  # DiTs interleaved in one process, e.g. sizes to train
            dirs = [d for d in args.compare_weights.split(",") if d]
            if not dirs:
                raise SystemExit("error: --modes weights needs --compare-weights DIR,DIR,...")
            engines = {d: build(argparse.Namespace(**{**vars(args), "weights": d}))[0]
                       for d in dirs}
            runs = {d: [] for d in dirs}
            for r in range(args.warmup + args.repeats):
                for d, other in engines.items():
                    got = time_continue(other, audio, params)
                    if r >= args.warmup:
                        runs[d].append(got)
            timing = dict(compare={d: dict(
                params_m=round(sum(p.numel() for p in engines[d].dit.parameters()) / 1e6, 2),
                median_s=median_rows(rows), totals_s=[round(x["total"], 3) for x in rows],
                realtime_factor=round(engine.chunk_samples / engine.sample_rate
                                      / median_rows(rows)["total"], 3))
                for d, rows in runs.items()})
        elif mode in ("http", "http_paired"):
            if args.decoder or args.time_codec:
                raise SystemExit("error: the http modes serve --codec as the server would; "
                                 "--decoder and --time-codec apply to the other modes")
            secs = {k: v[args.warmup:] for k, v in time_http(
                args, fast, audio, args.warmup + args.repeats, mode == "http_paired").items()}
            med = statistics.median(secs["http"])
            timing = dict(median_s=dict(total=round(med, 4)), realtime_factor=round(
                engine.chunk_samples / engine.sample_rate / med, 3))
            if mode == "http_paired":
                timing["totals_s"] = {k: [round(x, 3) for x in v] for k, v in secs.items()}
                timing["engine_median_s"] = round(statistics.median(secs["engine"]), 4)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        row = dict(mode=mode, date=time.strftime("%Y-%m-%d %H:%M"), weights=args.weights,
                   codec=args.codec, decoder=args.decoder or args.time_codec or args.codec,
                   encoder=args.time_codec or args.codec, isa=args.isa,
                   cpu=cpu_record(), threads=torch.get_num_threads(),
                   steps=list(params.validated(engine.codec.n_levels).steps),
                   levers={k: v["on"] for k, v in report.items() if k != "threads"},
                   warmup=args.warmup, repeats=args.repeats, torch=torch.__version__, **timing)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    main()
