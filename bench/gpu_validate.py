"""The first GPU run, prepared: one script, phase by phase, each phase's figures saved as it ends.

    python bench/gpu_validate.py                       # one H100: about 8 minutes
    python bench/gpu_validate.py --dry-run             # any CPU: tiny shapes, every phase (tests)
    python bench/gpu_validate.py --phases env kernel   # a subset

Phases (in order; each appends its result under "phases" in one JSON file, bench/results/
gpu_validate_<device>.json unless --out says otherwise, with the device name inside, so a run
cut short by a time limit keeps what finished; a phase that raises records its error and the
next one runs):
  env        versions, device, the attention backend `auto` picks for the model's shapes (and why)
  train_step a bf16-autocast training step of the DiT with the SDPA backend and with the kernel:
             loss and gradient agreement
  kernel     the kernel against the fp32 SDPA reference at real sizes: the training layout with
             the after chunk, PARTIAL tiles (segments straddling 64-tiles), an inference shape;
             forward and gradients, error beside SDPA's own in the same dtype
  attention  bench/attention.py: kernel vs FlexAttention vs SDPA + mask vs dense SDPA, forward and
             forward + backward, on the training layout and the sampler's shapes
  throughput training tokens/s and MFU (model/flops.py) for `base` at the largest batch that fits
             without checkpointing (training/dit/memory.py), through the real Trainer
  latency    /continue through the real engine path (bench/latency.py), batch 1 and 64, per phase
  server     64 concurrent /continue requests through the HTTP server: p50/p99 and the batch
             sizes the batcher formed (from /metrics)
--dry-run runs every phase on the CPU at tiny sizes (debug preset, debug codec, the Triton
interpreter in fp32/fp16), to keep the script from rotting; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("env", "train_step", "kernel", "attention", "throughput", "latency", "server")


def _load_bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Report:
    """The JSON file: rewritten whole after every phase (a cut-short run keeps what ran)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {**header, "phases": {}}
        if path.exists():  # a rerun of some phases adds to the earlier run's file
            old = json.loads(path.read_text())
            if old.get("device") == header["device"]:
                self.data["phases"] = old.get("phases", {})
        self._write()

    def add(self, phase: str, result: dict) -> None:
        self.data["phases"][phase] = result
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- phases


def phase_env(ctx) -> dict:
    import torch

    import model.attention as attn

    out = dict(torch=torch.__version__, python=platform.python_version(),
               cuda=torch.version.cuda, device=ctx.device_name)
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError as e:
        out["triton"] = f"unavailable: {e}"
    if ctx.cuda:
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    choices = {}
    for name, (D, dtype) in {"base bf16": (64, torch.bfloat16), "base fp32": (64, torch.float32),
                             "head dim 48 bf16": (48, torch.bfloat16)}.items():
        q = torch.zeros(1, 1, 1, D, dtype=dtype, device=ctx.device)
        with attn.attention_backend("auto"):
            choices[name] = attn.choose_backend(q, q, q)
    out["auto_backend"] = choices
    return out


def _tiny_or_base(ctx):
    from model.dit import DiTConfig

    if ctx.dry:
        return DiTConfig.from_name("debug", frames_per_chunk=(4, 8, 16, 32), codebook_size=64,
                                   max_after_chunks=1)
    return DiTConfig.from_name("base", max_after_chunks=1)


def phase_train_step(ctx) -> dict:
    import torch

    import model.attention as attn
    from model.diffusion import DiffusionConfig, MaskedDiffusion
    from model.dit import DiT

    cfg = _tiny_or_base(ctx)
    torch.manual_seed(0)
    net = DiT(cfg).to(ctx.device)
    with torch.no_grad():  # adaLN-Zero / zero heads would make most gradients exactly 0
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    B = 2 if ctx.dry else 4  # SDPA's masked rows may keep (B, H, N, N) weights: stay small
    windows = [torch.randint(0, cfg.codebook_size, (B, 4 * f), generator=g).to(ctx.device)
               for f in cfg.frames_per_chunk]
    loss_fn = MaskedDiffusion(DiffusionConfig(context_dropout=0.0))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.cuda
                else torch.autocast("cpu", enabled=False))

    def step(backend):
        net.zero_grad()
        with attn.attention_backend(backend), autocast:
            t0 = time.perf_counter()
            loss = loss_fn.loss(net, windows, n_ctx=[2] * B, n_after=[1] * (B // 2) + [0] * (B - B // 2),
                                generator=torch.Generator(ctx.device).manual_seed(1))["loss"]
            loss.backward()
            ctx.sync()
        grads = torch.cat([p.grad.float().flatten() for p in net.parameters()])
        return loss.item(), grads, time.perf_counter() - t0

    (l_s, g_s, t_s), (l_k, g_k, t_k) = step("sdpa"), step("triton")
    rel = ((g_k - g_s).norm() / g_s.norm().clamp(min=1e-30)).item()
    return dict(preset="debug" if ctx.dry else "base", batch=B, loss_sdpa=l_s, loss_kernel=l_k,
                loss_diff=abs(l_s - l_k), grad_rel_diff=rel, seconds_sdpa=round(t_s, 3),
                seconds_kernel=round(t_k, 3), ok=abs(l_s - l_k) < 2e-2 and rel < 5e-2)


def phase_kernel(ctx) -> dict:
    import torch

    import model.kernels.block_attention as ba
    from model.attention_rule import attention_ref
    from model.layout import collate

    fpc = (4, 8, 16, 32) if ctx.dry else (64, 128, 256, 512)
    block = 16 if ctx.dry else 64
    H, D = (1, 16) if ctx.dry else (10, 64)
    dtypes = [torch.float16] if ctx.dry else [torch.bfloat16, torch.float16]
    cases = {}
    batch = collate((2, 1), fpc, n_after=(1, 0))  # the after-chunk layout beside a shorter row
    cases["train_after_chunk"] = (batch.seg_id, batch.seg_id, batch.allowed)
    # PARTIAL tiles: segment boundaries moved off the tile grid by dropping a few leading tokens
    shift = block // 4 + 1
    cases["partial_tiles"] = (batch.seg_id[:, shift:], batch.seg_id[:, shift:], batch.allowed)
    seg = batch.seg_id[:1]
    noised_d = (batch.seg_role[0] == 2).nonzero().max().item()  # the last noised segment (D)
    q_seg = seg[:, (seg[0] == noised_d)]
    cases["infer_D"] = (q_seg, seg, batch.allowed[:1])
    out = {}
    for name, (seg_q, seg_k, allowed) in cases.items():
        seg_q, seg_k, allowed = (x.to(ctx.device) for x in (seg_q, seg_k, allowed))
        plan = ba.plan_block_attention(seg_q, seg_k, allowed, block, block)
        density = {k: round(v, 3) for k, v in plan.density().items()}
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            B = seg_q.shape[0]
            q = torch.randn(B, H, seg_q.shape[1], D, generator=g)
            k, v = (torch.randn(B, H, seg_k.shape[1], D, generator=g) for _ in range(2))
            do = torch.randn(q.shape, generator=g)

            def run(fn, dt, q=q, k=k, v=v, do=do, seg_q=seg_q, seg_k=seg_k, allowed=allowed):
                xs = [x.to(ctx.device, dt).requires_grad_() for x in (q, k, v)]
                o = fn(*xs, seg_q, seg_k, allowed)
                grads = torch.autograd.grad(o, xs, do.to(ctx.device, o.dtype))
                return [t.float() for t in (o, *grads)]

            exact = run(attention_ref, torch.float32)
            same = run(attention_ref, dtype)
            kern = run(lambda *a: ba.block_attention(*a, block_m=block, block_n=block), dtype)
            errs = {}
            for part, a, b, r in zip(("out", "dq", "dk", "dv"), kern, same, exact, strict=True):
                errs[part] = dict(kernel=(a - r).abs().max().item(), sdpa=(b - r).abs().max().item())
            ok = all(e["kernel"] <= 2 * e["sdpa"] + 1e-3 for e in errs.values())
            out[f"{name}/{str(dtype).removeprefix('torch.')}"] = dict(
                Nq=seg_q.shape[1], Nk=seg_k.shape[1], tiles=density, errors=errs, ok=ok)
    return out


def phase_attention(ctx) -> dict:
    bench = _load_bench("attention")
    args = ["--dry-run", "--batch", "2", "--infer-batch", "2"] if ctx.dry else ["--cfg"]
    res = bench.main(args + ["--out", str(ctx.tmp / "attention.json")])
    return {k: v for k, v in res.items() if k != "args"}


def phase_throughput(ctx) -> dict:
    import torch

    from model.dit import DiT
    from training.dit.memory import estimate

    train = _load_bench("train_throughput")
    if ctx.dry:
        args = ["--preset", "debug", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                "--workers", "0", "--device", "cpu"]
        batch = 2
    else:
        cfg = _tiny_or_base(ctx)
        with torch.device("meta"):
            n_params = DiT(cfg).num_params()
        est = estimate(cfg, n_params, 2, 0)  # the bench trains n_ctx = 2, no after chunk
        batch = max(1, min(64, est.max_batch(torch.cuda.get_device_properties(0).total_memory,
                                             checkpoint=False)))
        args = ["--preset", "base", "--batch-size", str(batch), "--steps", "20", "--warmup", "5",
                "--device", "cuda"]
    out = ctx.tmp / "throughput.jsonl"
    train.main(args + ["--out", str(out)])
    return dict(batch_that_fits=batch, **json.loads(out.read_text().splitlines()[-1]))


def phase_latency(ctx) -> dict:
    latency = _load_bench("latency")
    if ctx.dry:
        args = ["--preset", "debug", "--codec", "debug", "--batch-sizes", "1", "2",
                "--steps", "1,1,1,1", "--repeats", "1", "--warmup", "0"]
    else:
        args = ["--preset", "base", "--codec", "snac32k", "--device", "cuda",
                "--batch-sizes", "1", "64", "--repeats", "3"]
    return dict(rows=latency.main(args))


def phase_server(ctx) -> dict:
    import subprocess

    import httpx

    load = _load_bench("server_load")
    from model.codec import DEBUG_CODEC_CONFIG, SNAC_32KHZ_CONFIG, Codec
    from model.dit import DiT, DiTConfig
    from model.weights import save_pretrained

    weights = ctx.tmp / "weights"
    codec = Codec.load(DEBUG_CODEC_CONFIG if ctx.dry else SNAC_32KHZ_CONFIG, seed=0)
    codec.save(weights / "codec")
    save_pretrained(DiT(DiTConfig.from_name("debug" if ctx.dry else "base",
                                            codebook_size=codec.codebook_size)), weights / "dit")
    port = 18800 + os.getpid() % 1000
    env = dict(os.environ, SNAC_DIT_WEIGHTS=str(weights / "dit"),
               SNAC_DIT_CODEC=str(weights / "codec"), SNAC_DIT_DEVICE=ctx.device,
               SNAC_DIT_MAX_BATCH="64")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("the server exited before it was ready")
            time.sleep(0.5)
        else:
            raise RuntimeError("the server did not get ready in 300 s")
        n, conc = (4, 4) if ctx.dry else (256, 64)
        result = load.concurrency(url, n_requests=n, concurrency=conc)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        buckets = {}
        for line in metrics.splitlines():
            if line.startswith("snac_dit_batch_size_bucket"):
                le = line.split('le="')[1].split('"')[0]
                buckets[le] = float(line.rsplit(" ", 1)[1])
        result["batch_size_cumulative"] = buckets
        return result
    finally:
        proc.terminate()
        proc.wait(60)


RUNNERS = dict(env=phase_env, train_step=phase_train_step, kernel=phase_kernel,
               attention=phase_attention, throughput=phase_throughput, latency=phase_latency,
               server=phase_server)


class Context:
    def __init__(self, dry: bool, tmp: Path):
        import torch

        self.dry, self.tmp = dry, tmp
        self.cuda = torch.cuda.is_available() and not dry
        self.device = "cuda" if self.cuda else "cpu"
        self.device_name = (torch.cuda.get_device_name() if self.cuda
                            else f"cpu ({os.cpu_count()} cores)")
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the script runs")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.dry_run:  # the kernel runs under Triton's interpreter; set before triton loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU rehearsal")
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args.dry_run, Path(tmp))
        slug = "dry_run" if args.dry_run else "_".join(ctx.device_name.split()).replace("/", "_")
        out = args.out or ROOT / "bench" / "results" / f"gpu_validate_{slug}.json"
        report = Report(out, dict(device=ctx.device_name, dry_run=args.dry_run,
                                  date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                  command=" ".join(["python bench/gpu_validate.py",
                                                    *(argv if argv is not None else sys.argv[1:])])))
        for phase in args.phases:
            print(f"== {phase}", flush=True)
            t0 = time.perf_counter()
            try:
                result = RUNNERS[phase](ctx)
            except Exception as e:  # noqa: BLE001 - record it, go on: the next phases still count
                traceback.print_exc()
                result = dict(error=f"{type(e).__name__}: {e}")
            result["seconds"] = round(time.perf_counter() - t0, 1)
            report.add(phase, result)
            print(json.dumps(result, default=str)[:2000], flush=True)
        print(f"wrote {out}")
        return report.data


if __name__ == "__main__":
    main()
