"""Command line: `python -m clients continue in.wav [-o out.wav] [--steps 16,12,8,8] [--seed 7]`,
`python -m clients extend in.wav --chunks 5 [--stream]`,
`python -m clients inpaint in.wav --start 9 --end 11` (or --start-bar 5 --bars 2, or
--start-beat 9 --beats 4), `python -m clients loop in.wav [--bars 8]`,
`python -m clients vary in.wav --keep A|AB|beats [--start 6.144]`,
`python -m clients analyze in.wav` (tempo, beats, bars and key as JSON on stdout),
`python -m clients info`.

Without -o the result goes to a name derived from the input, in the current directory
(in-continued.wav, in-extended.wav, in-inpainted.wav, in-loop.wav, in-varied.wav). An existing
file is never overwritten unless --force is given.

The server URL comes from --url or $SNAC_DIT_URL (default http://127.0.0.1:8000); an API key
from --api-key or $SNAC_DIT_API_KEY. Exit status: 0 ok, 1 the server refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from clients.client import Client, join_chunks
from clients.errors import SnacDitError
from clients.wav import encode_wav


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("SNAC_DIT_URL", "http://127.0.0.1:8000"))
    common.add_argument("--api-key", default=os.environ.get("SNAC_DIT_API_KEY"))
    common.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")

    gen = argparse.ArgumentParser(add_help=False)
    gen.add_argument("input", type=Path, help="audio file (any format the server reads)")
    gen.add_argument("-o", "--output", type=Path,
                     help="WAV to write (default: the input's name + -continued.wav etc., in "
                          "the current directory)")
    gen.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    per_level = "one value for all levels, or one per level A,B,C,D"
    gen.add_argument("--steps", help=f"denoising steps: {per_level}, e.g. 16,12,8,8")
    gen.add_argument("--temperature", help=f"sampling temperature (0 = greedy): {per_level}, "
                                           "e.g. 1.0 or 1,1,0.9,0.9")
    gen.add_argument("--top-p", help=f"nucleus mass in (0, 1]: {per_level}, e.g. 0.95")
    gen.add_argument("--guidance", help=f"classifier-free guidance on the context (1 = off): "
                                        f"{per_level}, e.g. 1.5 or 2,1.5,1,1")
    gen.add_argument("--gumbel", help=f"scale of the Gumbel noise on the unmasking order "
                                      f"(0 = by confidence alone): {per_level}, e.g. 1 or 0")
    gen.add_argument("--confidence", choices=["top", "sampled"],
                     help="what ranks positions for unmasking: the top log-prob (default) or "
                          "the sampled token's (MaskGIT)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--style", type=Path,
                     help="reference clip: take its style (models with style actions; /info)")
    gen.add_argument("--action", type=int, help="a style action 0..K-1 instead of --style")
    gen.add_argument("--style-scale", type=float,
                     help="guidance on the style: 1 = conditioned (default), 0 = ignore")
    gen.add_argument("--style-guidance", choices=["cfg", "icg"],
                     help="against no style (cfg, default) or a random action (icg)")
    cont = argparse.ArgumentParser(add_help=False)
    cont.add_argument(
        "--include-input", action="store_true", help="write the input followed by the continuation"
    )

    ap = argparse.ArgumentParser(
        prog="python -m clients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("continue", parents=[common, gen, cont], help="continue a clip by 6.144 s")
    ext = sub.add_parser("extend", parents=[common, gen, cont], help="continue by N chained chunks")
    ext.add_argument("--chunks", type=int, required=True)
    ext.add_argument("--stream", action="store_true", help="report each chunk as it arrives")
    inp = sub.add_parser("inpaint", parents=[common, gen],
                         help="regenerate a span of the input from what surrounds it")
    inp.add_argument("--start", type=float, help="span start, seconds")
    inp.add_argument("--end", type=float,
                     help="span end, seconds (at most 6.144 s after --start)")
    inp.add_argument("--start-bar", type=int,
                     help="instead of --start/--end: the first bar (bar 1 = the first downbeat)")
    inp.add_argument("--bars", type=int, help="with --start-bar: how many bars (default 1)")
    inp.add_argument("--start-beat", type=int,
                     help="instead of --start/--end: the first beat (beat 1 = the first beat)")
    inp.add_argument("--beats", type=int, help="with --start-beat: how many beats (default 1)")
    lp = sub.add_parser("loop", parents=[common, gen],
                        help="append a bridge that leads back into the input's start (play on "
                             "repeat)")
    lp.add_argument("--bars", type=int,
                    help="make the loop this many whole bars from the first downbeat")
    var = sub.add_parser("vary", parents=[common, gen],
                         help="regenerate a chunk's finer levels under its own coarse ones")
    var.add_argument("--keep", choices=["A", "AB", "beats"], default="A",
                     help="coarse levels kept: A (melody, rhythm) or AB (default A); or beats: "
                          "every level around each beat, the rest new")
    var.add_argument("--start", type=float,
                     help="where the 6.144 s chunk begins, seconds (default: the last whole one)")
    ana = sub.add_parser("analyze", parents=[common],
                         help="print the input's tempo, beats, downbeats, time signature and key")
    ana.add_argument("input", type=Path, help="audio file (any format the server reads)")
    sub.add_parser("info", parents=[common], help="print the server's /info")
    act = sub.add_parser("actions", parents=[common],
                         help="list the model's style actions; --example K saves one to hear")
    act.add_argument("--example", type=int, metavar="K",
                     help="save action K's example chunk (OGG) to -o or action-K.ogg")
    act.add_argument("-o", "--output", type=Path)
    act.add_argument("--force", action="store_true", help="overwrite the output file")
    return ap


SUFFIX = {"continue": "continued", "extend": "extended", "inpaint": "inpainted", "loop": "loop",
          "vary": "varied"}


def output_path(args) -> Path:
    """-o, or `<input stem>-<what was done>.wav` here; FileExistsError unless --force."""
    out = args.output or Path(f"{args.input.stem}-{SUFFIX[args.command]}.wav")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it, or -o another name")
    return out


def _write(path: Path, data: bytes, force: bool) -> None:
    with open(path, "wb" if force else "xb") as f:  # "xb": never clobber a file made meanwhile
        f.write(data)


def _summary(params: dict, edit: dict | None = None) -> str:
    return " ".join(f"{k}={v}" for k, v in {**params, **(edit or {})}.items())


def _sampling(args) -> dict:
    return dict(
        steps=args.steps,
        temperature=args.temperature,
        top_p=args.top_p,
        guidance=args.guidance,
        gumbel=args.gumbel,
        confidence=args.confidence,
        seed=args.seed,
        style=args.style,
        action=args.action,
        style_scale=args.style_scale,
        style_guidance=args.style_guidance,
    )


def _params(args) -> dict:
    return dict(_sampling(args), include_input=args.include_input)


def _actions(c: Client, args) -> None:
    if args.example is None:
        actions = c.actions()
        if not actions:
            print("this model has no style actions (it was trained without them)",
                  file=sys.stderr)
        for a in actions:
            print(f"{a['action']}: {a['description'] or '(not described yet)'}"
                  + ("" if not a.get("example") else "  [example: --example "
                     f"{a['action']}]"))
        return
    out = args.output or Path(f"action-{args.example}.ogg")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it, or -o another name")
    _write(out, c.action_example(args.example), args.force)
    print(f"saved action {args.example}'s example to {out}", file=sys.stderr)


def _run(args) -> None:
    with Client(args.url, api_key=args.api_key, timeout=args.timeout) as c:
        if args.command == "info":
            print(json.dumps(c.info(), indent=2))
            return
        if args.command == "actions":
            _actions(c, args)
            return
        if not args.input.is_file():
            raise FileNotFoundError(f"{args.input}: no such file")
        if args.command == "analyze":
            a = c.analyze(args.input)
            print(json.dumps(a, indent=2))
            print(f"{a['tempo']:.1f} BPM, {a['time_signature']}, {a['key']}, {a['bars']} bars",
                  file=sys.stderr)
            return
        out = output_path(args)  # before the request: refuse without spending the server's time
        start = time.perf_counter()
        if args.command == "extend" and args.stream:
            chunks = []
            for ch in c.extend_stream(args.input, args.chunks, **_params(args)):
                chunks.append(ch)
                what = "input" if ch.index < 0 else f"chunk {ch.index + 1}/{args.chunks}"
                print(f"{what} after {time.perf_counter() - start:.1f} s", file=sys.stderr)
            audio, rate = join_chunks(chunks)
            _write(out, encode_wav(audio, rate), args.force)
            seed, ran = chunks[0].seed, _summary(chunks[0].params)
        else:
            if args.command == "continue":
                r = c.continue_(args.input, **_params(args))
            elif args.command == "extend":
                r = c.extend(args.input, args.chunks, **_params(args))
            elif args.command == "inpaint":
                r = c.inpaint(args.input, args.start, args.end, start_bar=args.start_bar,
                              bars=args.bars, start_beat=args.start_beat, beats=args.beats,
                              **_sampling(args))
            elif args.command == "loop":
                r = c.loop(args.input, bars=args.bars, **_sampling(args))
            else:
                r = c.vary(args.input, keep=args.keep, start=args.start, **_sampling(args))
            _write(out, r.wav, args.force)
            audio, rate, seed = r.audio, r.sample_rate, r.seed
            ran = _summary(r.params, r.edit)
        print(
            f"wrote {out}: {len(audio) / rate:.3f} s at {rate} Hz, seed={seed} {ran}"
            f" ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command == "inpaint" and args.start_bar is None and args.start_beat is None and (
            args.start is None or args.end is None):
        ap.error("inpaint needs --start and --end (seconds), or --start-bar [--bars], or "
                 "--start-beat [--beats]")
    try:
        _run(args)
    except BrokenPipeError:
        # `python -m clients info | head`: the reader left. Say nothing and stop, as cat does;
        # point stdout at devnull so the interpreter's own final flush cannot complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except ValueError as e:  # a bad --url
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SnacDitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
