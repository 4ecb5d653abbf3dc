"""Training end to end: the real entry point on tokens from the real tokeniser and the debug codec,
export into the engine, config handling, and loss going down on a memorisable token set."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model.engine import ContinuationEngine
from model.sampler import SamplingParams
from tests.conftest import tone
from tests.test_resume import debug_config, make_tokens
from training.dit.config import ConfigError, TrainConfig, load_config, parse_overrides
from training.dit.trainer import Trainer
from training.run.config import tomllib
from training.tokens.shards import split_of

ROOT = Path(__file__).resolve().parents[1]
SR = 32000


@pytest.fixture(scope="module")
def real_tokens(tmp_path_factory, debug_codec_dir) -> Path:
    """Two 19 s synthetic WAVs (one train, one val: 3 chunks fit) through the real tokeniser."""
    from training.tokens.tokenizer import main as tokenize

    root = tmp_path_factory.mktemp("real_tokens")
    audio = root / "audio"
    audio.mkdir()
    names = [f"song{i}.wav" for i in range(50)]
    train = next(n for n in names if split_of(n, 0.5) == "train")
    val = next(n for n in names if split_of(n, 0.5) == "val")
    sf.write(audio / train, tone(19.0, freq=220.0), SR)
    sf.write(audio / val, tone(19.0, freq=330.0), SR)
    out = root / "tokens"
    rc = tokenize(["--audio", str(audio), "--out", str(out), "--codec", debug_codec_dir,
                   "--val-fraction", "0.5", "--no-progress"])
    assert rc == 0
    return out


def test_smoke_entry_point_curriculum_eval_export_engine(tmp_path, real_tokens, debug_codec_dir):
    args = [
        "--config", "training/configs/debug.toml", "--data.tokens", str(real_tokens),
        "--out_dir", str(tmp_path), "--name", "smoke", "--data.batch_size", "1",
        "--curriculum.stages.0.steps", "2", "--curriculum.stages.1.steps", "2",
        "--curriculum.stages.2.steps", "2", "--eval.every", "6", "--eval.batches", "1",
        "--eval.batch_size", "1", "--eval.n_ctx", "[0, 2]", "--ckpt.every", "2",
        "--log.every", "1", "--eval.sample_steps", "[2, 2, 2, 2]",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "training/train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "smoke"
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-000004", "ckpt-000006"]

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["stage"] for r in train] == ["pretrain"] * 2 + ["one_chunk"] * 2 + ["full"] * 2
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train)
    assert all(r["mfu"] is None for r in train)  # CPU: no peak FLOP/s, MFU n/a
    (ev,) = [r for r in rows if r["kind"] == "eval"]
    for n in (0, 2):
        for m in ("0.3", "0.6", "0.9"):
            for lvl in "ABCD":
                assert 0 <= ev[f"acc_{lvl}/n{n}/m{m}"] <= 1
                assert math.isfinite(ev[f"ce_{lvl}/n{n}/m{m}"])
    for lvl in "ABCD":  # the token-frequency baseline on the same targets, logged alongside
        assert math.isfinite(ev[f"unigram_ce_{lvl}"]) and 0 <= ev[f"unigram_acc_{lvl}"] <= 1
    # The fixed val window was continued and written next to the logs: 2 context chunks + 1 new.
    audio, sr = sf.read(ev["sample"])
    assert sr == SR and audio.shape == (3 * 196608,) and np.abs(audio).max() > 0
    assert (run / "samples" / "reference.wav").is_file()

    # Export (script entry works; the function writes the serving dir) -> the engine continues.
    help_out = subprocess.run([sys.executable, "-m", "training.dit.export", "--help"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    assert help_out.returncode == 0 and "--raw" in help_out.stdout
    from training.dit.export import main as export

    assert export([str(run), str(tmp_path / "serve")]) == 0
    config = json.loads((tmp_path / "serve" / "config.json").read_text())
    assert config["training"]["step"] == 6 and config["training"]["weights"] == "ema"
    # the debug curriculum trains the editing layouts too, so the model may be asked to edit
    assert config["dit"]["max_after_chunks"] == 1
    engine = ContinuationEngine.load(tmp_path / "serve", debug_codec_dir)
    out = engine.continue_audio(torch.from_numpy(tone(12.288)),
                                SamplingParams(steps=(2, 2, 2, 2), seed=0))
    assert out.shape == (196608,) and torch.isfinite(out).all()


def test_missing_tokens_exit_2_with_the_tokenise_command(tmp_path):
    proc = subprocess.run([sys.executable, "training/train.py", "--data.tokens",
                           str(tmp_path / "nothing")], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert f"python -m training.tokens --audio path/to/your/audio --out {tmp_path / 'nothing'}" \
        in proc.stderr


@pytest.mark.parametrize("device, match", [("gpu", "not a device"),
                                           ("cuda", "no CUDA device is available")])
def test_bad_device_exit_2_with_a_clear_error(tmp_path, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tokens = make_tokens(tmp_path / "tokens", n_train=2, chunks=3)
    proc = subprocess.run([sys.executable, "training/train.py", "--data.tokens", str(tokens),
                           "--device", device, "--out_dir", str(tmp_path / "runs")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert match in proc.stderr and "Traceback" not in proc.stderr


def memorise(steps: int, lr: float, **extra) -> dict:
    """Overrides for a run that only memorises: one stage, full context, constant lr."""
    return {"curriculum.stages.0.steps": 0, "curriculum.stages.1.steps": 0,
            "curriculum.stages.2.steps": steps, "curriculum.stages.2.n_ctx": [0.0, 0.0, 1.0],
            "optim.lr": lr, "optim.min_lr": lr, "data.batch_size": 4,
            "diffusion.context_dropout": 0.0, "eval.every": 0, "ckpt.every": 1000,
            "log.every": 1, **extra}


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_loss_decreases_on_a_memorisable_token_set(tmp_path, dtype, capsys):
    # Every train file holds the same 3 chunks, full context only: one window to memorise.
    # On CPU, auto is fp32 and bf16 is bf16 autocast (the demo DiT's recipe): both must learn.
    tokens = make_tokens(tmp_path / "tokens", n_train=2, chunks=3, same=True)
    cfg = debug_config(tokens, tmp_path, "memo",
                       **memorise(40, 3e-3, **{"optim.grad_accum": 1, "dtype": dtype}))
    assert Trainer(cfg).fit() == 0
    assert ("(bf16 autocast)" if dtype == "bf16" else "(fp32)") in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "memo" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses[0] > 0.9 * math.log(32)  # starts near chance (zero-initialised heads)
    assert np.mean(losses[-5:]) < 0.25 * losses[0], losses


def test_default_toml_equals_the_dataclass_defaults():
    with open(ROOT / "training/configs/default.toml", "rb") as f:
        data = tomllib.load(f)
    assert load_config(ROOT / "training/configs/default.toml") == TrainConfig()
    assert set(data) == set(TrainConfig().to_dict())  # every section spelled out


def test_overrides_parse_and_validate(tmp_path):
    path, pairs = parse_overrides(["--config", "x.toml", "--optim.lr", "1e-4", "--compile",
                                   "--curriculum.stages.1.n_ctx=[0, 1, 0]", "--name", "a",
                                   "--resume"])
    assert path == "x.toml"
    cfg = load_config(None, pairs)
    assert cfg.optim.lr == 1e-4 and cfg.compile is True and cfg.resume == "latest"
    assert cfg.curriculum.stages[1].n_ctx == [0.0, 1.0, 0.0] and cfg.name == "a"
    cfg = load_config(None, [("model.preset", "small"), ("model.n_layers", 3)])
    assert cfg.model == {"preset": "small", "n_layers": 3}
    for bad in ([("optim.lr", "fast")], [("optim.nope", 1)], [("curriculum.stages.0.n_ctx", [1, 0])],
                [("data.batch_size", 0)], [("curriculum.stages.3.steps", 1)]):
        with pytest.raises(ConfigError):
            load_config(None, bad)
    toml = tmp_path / "c.toml"
    toml.write_text('name = "x"\n[optim]\nlr = 1e-3\n[[curriculum.stages]]\nsteps = 5\nn_ctx = [1, 0, 0]\n')
    cfg = load_config(toml, [("optim.lr", 2e-3)])
    assert cfg.name == "x" and cfg.optim.lr == 2e-3 and cfg.total_steps == 5


def test_fine_tune_starts_from_an_exported_model(tmp_path):
    """`init`: the run starts from an export's weights and architecture (what `adapt` builds
    on); an export made for other tokens is refused, naming the mismatch."""
    from model.weights import load_dit
    from training.dit.export import main as export

    tokens = make_tokens(tmp_path / "tokens", n_train=2, chunks=3, same=True)
    memo = memorise(30, 3e-3)
    assert Trainer(debug_config(tokens, tmp_path, "base", **memo)).fit() == 0
    assert export([str(tmp_path / "base"), str(tmp_path / "served")]) == 0
    served = load_dit(tmp_path / "served")
    # --fp16 (how weights/demo ships): half the bytes, the same weights to fp16 precision
    assert export([str(tmp_path / "base"), str(tmp_path / "half"), "--fp16"]) == 0
    half = load_dit(tmp_path / "half")
    assert all(v.dtype == torch.float16 for v in half.state_dict().values())
    assert all(torch.equal(v.half(), half.state_dict()[k]) for k, v in served.state_dict().items())
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("half") < 0.55 * size("served")

    tuned = Trainer(debug_config(tokens, tmp_path, "tuned", init=str(tmp_path / "served"),
                                 **{**memo, "curriculum.stages.2.steps": 3}))
    start = {k: v.detach().clone() for k, v in tuned.dit.state_dict().items()}
    assert all(torch.equal(start[k], v.float()) for k, v in served.state_dict().items())
    assert tuned.model_cfg == served.config
    assert tuned.fit() == 0
    rows = [json.loads(x) for x in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    first = [r["loss"] for r in rows if r["kind"] == "train"][0]
    assert first < 0.5 * math.log(32)          # it already knows the windows: not from scratch

    other = make_tokens(tmp_path / "other", n_train=2, chunks=3, codebook_size=64)
    with pytest.raises(ConfigError, match="codebook_size"):
        Trainer(debug_config(other, tmp_path, "bad", init=str(tmp_path / "served")))


def test_warm_start_goes_on_from_an_exported_runs_step(tmp_path):
    """`init_step`: a machine without the run directory continues the shipped snapshot where its
    run stood: the same curriculum stage and lr schedule, the export's weights, a fresh optimiser
    whose lr ramps back onto the schedule; the continued run resumes like any other."""
    from model.weights import load_dit
    from training.dit.card import main as card_main
    from training.dit.export import main as export
    from training.dit.optim import lr_at

    tokens = make_tokens(tmp_path / "tokens", n_train=2, chunks=4)
    long = {"curriculum.stages.2.steps": 8, "optim.rewarm_steps": 3, "eval.every": 3}
    assert Trainer(debug_config(tokens, tmp_path, "first", stop_at=3, **long)).fit() == 0
    assert export([str(tmp_path / "first"), str(tmp_path / "snap"), "--fp16"]) == 0
    assert card_main(["--run", str(tmp_path / "first"), "--weights", str(tmp_path / "snap")]) == 0
    assert "**Work in progress**" in (tmp_path / "snap" / "MODEL_CARD.md").read_text()  # 3 of 12
    # The export ships the run's log; an older snapshot may carry rows recovered as summaries.
    shipped = (tmp_path / "snap" / "metrics.jsonl").read_text()
    assert shipped == (tmp_path / "first" / "metrics.jsonl").read_text()
    recovered = {"step": 2, "kind": "eval", "ce_mean": 3.25, "ce_A": 3.0, "ce_B": 3.125,
                 "ce_C": 3.375, "ce_D": 3.5, "recovered": "from an older card"}
    (tmp_path / "snap" / "metrics.jsonl").write_text(json.dumps(recovered) + "\n" + shipped)

    cfg = debug_config(tokens, tmp_path, "warm", init=str(tmp_path / "snap"), init_step=3,
                       stop_at=5, **long)
    warm = Trainer(cfg)
    assert warm.step == 3 and warm.ema.num_updates == 3
    snap = load_dit(tmp_path / "snap").state_dict()
    assert all(torch.equal(warm.dit.state_dict()[k], v.float()) for k, v in snap.items())
    assert warm.fit() == 0 and warm.step == 5
    rows = [json.loads(x) for x in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    # (stop_at evaluates too: the checkpoint a period ends with has its held-out figures)
    assert rows[0] == recovered and [r["step"] for r in rows[1:]] == [1, 2, 3, 3, 4, 5, 5]
    assert [r["kind"] for r in rows[-2:]] == ["train", "eval"]
    train = [r for r in rows if r["kind"] == "train" and r["step"] > 3]
    assert [r["step"] for r in train] == [4, 5]
    assert [r["stage"] for r in train] == ["one_chunk", "full"]  # stages of 2, 2, 8 steps
    total = cfg.total_steps
    # A row logs the lr the next step will use: ramped 2/3, 3/3, then the schedule itself.
    ramp = [lr_at(4 + i, cfg.optim, total) * min(1, (i + 2) / 3) for i in range(2)]
    assert [r["lr"] for r in train] == pytest.approx(ramp)

    # Stopped and re-run: it resumes from its own checkpoint, the ramp done, to the end, on
    # its own schedule even when --init_step names another step (here 5: the step a snapshot
    # exported from this run would carry, as a working period's notes say to pass).
    again = Trainer(debug_config(tokens, tmp_path, "warm", init=str(tmp_path / "snap"),
                                 init_step=5, **long))
    again.load(tmp_path / "warm")
    assert again.step == 5 and again.cfg.init_step == 3
    assert again.fit() == 0 and again.step == total
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["init_step"] == 3
    rows = [json.loads(x) for x in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if r["kind"] == "train" and r["step"] > 5]
    assert [r["lr"] for r in resumed] == pytest.approx(
        [lr_at(r["step"], cfg.optim, total) for r in resumed])
    assert resumed[-1]["step"] == total and resumed[-1]["lr"] == pytest.approx(cfg.optim.min_lr)
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 3, 5, 6, 9, 12]  # 2: recovered

    # Its card spans the whole run: the recovered row and the warm start are on it.
    # Its tokens (3 files) were a part of a 4-track corpus: the card says so.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    tracks = [{"package": "p", "licence": "CC0-1.0", "status": "kept",
               "output_path": f"audio/t{i}.flac"} for i in range(4)]
    (corpus / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tracks))
    (corpus / "summary.json").write_text(json.dumps({"total_hours": 0.1, "kept": 4, "packages": {
        "p": {"kept": 4, "hours": 0.1, "licences": {"CC0-1.0": 4}}}}))
    assert export([str(tmp_path / "warm"), str(tmp_path / "served"), "--fp16"]) == 0
    assert card_main(["--run", str(tmp_path / "warm"), "--weights", str(tmp_path / "served"),
                      "--corpus", str(corpus)]) == 0
    text = (tmp_path / "served" / "MODEL_CARD.md").read_text()
    assert "They cover 3 of the corpus's 4 tracks" in text
    assert "| 2 | 3.250 | 3.000 | 3.125 | 3.375 | 3.500 |" in text
    assert "Warm-started at step 3" in text and f"Steps: {total} of {total}" in text

    with pytest.raises(ConfigError, match="set init"):
        debug_config(tokens, tmp_path, "bad", init_step=4)
    with pytest.raises(ConfigError, match="not inside the curriculum"):
        debug_config(tokens, tmp_path, "bad", init=str(tmp_path / "snap"), init_step=12, **long)


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "training/configs").glob("*.toml")
                                        if not p.name.startswith("codec_")),
                         ids=lambda p: p.name)
def test_shipped_dit_configs_load(path):
    cfg = load_config(path)
    assert cfg.total_steps > 0 and cfg.model["preset"] in ("debug", "small", "base")


def test_unigram_baseline_is_the_cross_entropy_of_token_frequencies(tmp_path):
    """Train tokens drawn from a known skewed distribution: the baseline's CE on val targets is
    that distribution's cross-entropy, its accuracy the share of the most frequent token."""
    import torch

    from training.dit.evaluate import unigram_baseline
    from training.tokens import shards

    rng = np.random.default_rng(0)
    p = np.array([0.7, 0.2, 0.1])
    files = {f"s{i}.wav": [rng.choice(3, size=64 * 40 * 8 // st, p=p).astype(np.uint16)
                           for st in (8, 4, 2, 1)] for i in range(4)}
    manifest = shards.write_token_dir(tmp_path, files, codebook_size=8)
    target = [torch.zeros(2, 2 * f, dtype=torch.int64) for f in (64, 128, 256, 512)]
    for w in target:
        w[:, -w.shape[1] // 2:] = torch.tensor([0, 1] * (w.shape[1] // 4))  # half 0, half 1
    base = unigram_baseline(tmp_path, manifest, target)
    want = -(0.5 * np.log(0.7) + 0.5 * np.log(0.2))
    for lvl in "ABCD":
        assert base[lvl]["ce"] == pytest.approx(want, abs=0.02)
        assert base[lvl]["acc"] == pytest.approx(0.5)


def test_model_card_of_an_exported_snapshot(tmp_path):
    """`python -m training.dit.card`: the card states the exported step, the architecture,
    the curriculum, the held-out split, and the last evaluation's per-level figures next to
    the untrained (ln V) and unigram baselines, all read from what the run logged."""
    from training.dit.card import continuation_text
    from training.dit.card import main as card_main
    from training.dit.export import main as export

    tokens = make_tokens(tmp_path / "tokens", n_train=2, chunks=4)
    assert Trainer(debug_config(tokens, tmp_path, "carded")).fit() == 0  # 6 steps, eval at 3, 6
    weights = tmp_path / "served"
    assert export([str(tmp_path / "carded"), str(weights), "--fp16"]) == 0
    result = {"date": "2026-12-01", "windows": 4, "tracks": 2, "steps": [16, 12, 8, 8], "seed": 0,
              "metrics": {s: {k: 0.5 for k in ("frechet", "harmony", "timbre", "retrieval",
                                               "seam", "copy")}
                          for s in ("model", "codec", "repeat", "random", "real")}}
    assert "codec's domain" not in continuation_text(result)  # results from before that table
    result["metrics_codec_domain"] = {s: {k: 0.25 for k in result["metrics"]["model"]}
                                      for s in ("model", "repeat", "random", "real")}
    (tmp_path / "eval.json").write_text(json.dumps(result))
    assert card_main(["--run", str(tmp_path / "carded"), "--weights", str(weights),
                      "--eval", str(tmp_path / "eval.json")]) == 0
    text = (weights / "MODEL_CARD.md").read_text()

    rows = [json.loads(x) for x in (tmp_path / "carded" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in rows if r["kind"] == "eval"][-1]
    assert last_eval["step"] == 6 and "snapshot at step 6" in text and "Steps: 6 of 6" in text
    a_cells = [v for k, v in last_eval.items() if k.startswith("ce_A/")]
    assert f"| A | {sum(a_cells) / len(a_cells):.3f} |" in text
    assert f"{last_eval['unigram_ce_A']:.3f}" in text and f"{math.log(32):.3f}" in text
    assert "F16" in text and "pretrain" in text and "| model | 0.500 |" in text
    assert "| codec | 0.500 |" in text and "perfect tokens" in text
    coded = text[text.index("In the codec's domain"):]
    assert "| model | 0.250 |" in coded and "| real | 0.250 |" in coded
    assert "1 held-out files" in text and "Training time:" in text
    assert "curriculum is complete" in text and "Work in progress" not in text  # 6 of 6

    # weights exported from another run are refused, naming both
    assert Trainer(debug_config(tokens, tmp_path, "other")).fit() == 0
    assert card_main(["--run", str(tmp_path / "other"), "--weights", str(weights)]) == 2


def test_lora_fine_tune_trains_only_adapters_and_exports_a_plain_dit(tmp_path):
    """`[lora] rank = r`: from an exported model, only the adapters train; the run starts from
    the base model exactly (first loss equal to a full fine-tune's), learns, and the export
    is a plain DiT whose forward is the adapted model's."""
    from model.weights import load_dit
    from training.dit.export import main as export
    from training.dit.lora import LoRALinear, adapter_state, merge_state
    from training.run import checkpoint as ckpt_io

    # The base model memorises one window; the adapters must move it to another.
    other = make_tokens(tmp_path / "other", n_train=2, chunks=3, same=True, seed=1)
    tokens = make_tokens(tmp_path / "tokens", n_train=2, chunks=3, same=True)
    memo = memorise(30, 1e-2)
    assert Trainer(debug_config(other, tmp_path, "base", **memorise(40, 3e-3))).fit() == 0
    assert export([str(tmp_path / "base"), str(tmp_path / "served")]) == 0
    init = str(tmp_path / "served")

    with pytest.raises(ConfigError, match="set init"):
        debug_config(tokens, tmp_path, "bad", **{"lora.rank": 4})
    full = Trainer(debug_config(tokens, tmp_path, "full", init=init, **{**memo, "curriculum.stages.2.steps": 1}))
    assert full.fit() == 0
    lora = Trainer(debug_config(tokens, tmp_path, "lora", init=init, **{**memo, "lora.rank": 4}))
    assert any(isinstance(m, LoRALinear) for m in lora.dit.modules())
    base_state = {k: v.clone() for k, v in lora.dit.state_dict().items()}
    trainable = [n for n, p in lora.dit.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert lora.fit() == 0

    losses = lambda run: [json.loads(x)["loss"] for x in  # noqa: E731
                          (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                          if json.loads(x)["kind"] == "train"]
    assert losses("lora")[0] == pytest.approx(losses("full")[0], rel=1e-6)  # B = 0 at the start
    assert np.mean(losses("lora")[-5:]) < 0.5 * losses("lora")[0]
    after = lora.dit.state_dict()
    for k, v in base_state.items():
        if ".lora_" not in k:
            assert torch.equal(after[k], v), k  # the base stays as it was
    assert any(after[k].abs().sum() > 0 for k in adapter_state(after) if k.endswith("lora_b"))

    assert export([str(tmp_path / "lora"), str(tmp_path / "adapted")]) == 0
    plain = load_dit(tmp_path / "adapted")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    ema = ckpt_io.load_checkpoint(tmp_path / "lora")["weights"]["ema"]
    merged = merge_state(ema, 16.0 / 4)
    assert all(torch.allclose(plain.state_dict()[k], v) for k, v in merged.items())
    lora.dit.load_state_dict(ema)  # the adapted model (EMA weights) against its export
    from model.diffusion import DiffusionConfig
    from training.dit.evaluate import masked_token_metrics
    from training.tokens.windows import TokenWindows

    val = TokenWindows(tokens, "val", n_ctx=2)
    items = [val[i]["tokens"] for i in range(min(2, len(val)))]
    batch = [torch.stack([it[lvl] for it in items]) for lvl in range(4)]
    sched = DiffusionConfig().schedules
    a = masked_token_metrics(lora.dit.eval(), batch, 2, 0.5, sched, seed=0)
    b = masked_token_metrics(plain, batch, 2, 0.5, sched, seed=0)
    assert a.keys() == b.keys() and len(a) == 4
    for lvl in a:
        assert a[lvl][0] == pytest.approx(b[lvl][0], rel=1e-4)
