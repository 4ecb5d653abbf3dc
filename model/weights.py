"""Weight files, in one place: the DiT's serving directory and the SNAC codec's sources.

    DiT    save_pretrained(dit, DIR, extra) -> DIR/model.safetensors + DIR/config.json
           read_dit_config(DIR), load_dit(DIR)
    codec  load_snac(config dict | local dir | hub id), save_snac(snac, config, DIR)
           (DIR/config.json + model.safetensors + pytorch_model.bin: snac.SNAC.from_pretrained
           reads it too; a decoder that is not SNAC's own (model/vocoder.py) adds
           DIR/decoder.json + DIR/decoder.safetensors beside them, an encoder that is not
           (model/spectral_encoder.py) DIR/encoder.json + DIR/encoder.safetensors)

`dit.py`, `codec.py` and `engine.py` build and run models; they never open a file themselves.
Training checkpoints (optimiser state, resumable runs) are training/run/checkpoint.py's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from snac import SNAC

from model.dit import DiT, DiTConfig

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
DECODER_CONFIG_FILE, DECODER_WEIGHTS_FILE = "decoder.json", "decoder.safetensors"
ENCODER_CONFIG_FILE, ENCODER_WEIGHTS_FILE = "encoder.json", "encoder.safetensors"
# SNAC parts a codec may replace: config key -> (its files, the module that builds it)
REPLACED_PARTS = {"encoder": (ENCODER_CONFIG_FILE, ENCODER_WEIGHTS_FILE),
                  "decoder": (DECODER_CONFIG_FILE, DECODER_WEIGHTS_FILE)}


def _part_builders(part: str):
    """(build(spec) -> module, spec(module) -> dict) for a replaced SNAC part."""
    if part == "decoder":
        from model.vocoder import build_decoder, decoder_spec

        return build_decoder, decoder_spec
    from model.spectral_encoder import build_encoder, encoder_spec

    return build_encoder, encoder_spec


class CodecLoadError(RuntimeError):
    """A codec source that cannot be loaded: a bad path, a hub id offline, mismatched weights."""


# ----------------------------------------------------------------------------- codec
def snac_kwargs(config: dict) -> dict:
    """The SNAC constructor's part of a codec config (without its "encoder"/"decoder" specs)."""
    return {k: v for k, v in config.items() if k not in REPLACED_PARTS}


def build_snac(config: dict) -> SNAC:
    """SNAC(**config), with SNAC's decoder replaced by the one `config["decoder"]` describes (a
    model/vocoder.py spec) and its encoder by `config["encoder"]`'s (model/spectral_encoder.py),
    if any. A replaced SNAC decoder is built at the config's decoder_dim, which such configs keep
    tiny: it only exists so the SNAC files load."""
    snac = SNAC(**snac_kwargs(config))
    for part in REPLACED_PARTS:
        if config.get(part):
            setattr(snac, part, _part_builders(part)[0](config[part]))
    return snac


def load_snac(source: str | dict | os.PathLike, seed: int = 0) -> tuple[SNAC, dict]:
    """A `snac.SNAC` and its constructor config from a config dict (random init, seeded), a local
    directory (config.json + model.safetensors or pytorch_model.bin, and decoder.json +
    decoder.safetensors when its decoder is not SNAC's) or a hub id (downloads).
    The config carries the decoder's spec under "decoder" when it is not SNAC's own.
    Returned as built: `Codec` puts it in eval mode, the codec trainer trains it."""
    if isinstance(source, dict):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            snac, config = build_snac(source), dict(source)
        for part in REPLACED_PARTS:   # the whole spec, as its saved PART.json will hold it
            if config.get(part):
                config[part] = _part_builders(part)[1](getattr(snac, part))
        return snac, config
    path = Path(source)
    if path.is_dir():
        return _snac_from_dir(path)
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise CodecLoadError(
            f"codec {str(source)!r} is neither a local directory nor a hub id of the form 'owner/name'"
        )
    return _snac_from_hub(str(source))


def _snac_from_dir(path: Path) -> tuple[SNAC, dict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CodecLoadError(f"codec directory {path} has no config.json")
    config = json.loads(config_file.read_text())
    snac = SNAC(**config)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise CodecLoadError(
            f"codec directory {path} has neither model.safetensors nor pytorch_model.bin"
        )
    try:
        snac.load_state_dict(state)
    except RuntimeError as e:
        raise CodecLoadError(f"codec weights in {path} do not match its config.json: {e}") from e
    for part, (spec_file, weights_file) in REPLACED_PARTS.items():
        if not (path / spec_file).is_file():
            continue
        from safetensors.torch import load_file

        config[part] = json.loads((path / spec_file).read_text())
        try:
            module = _part_builders(part)[0](config[part])
            module.load_state_dict(load_file(path / weights_file))
        except (ValueError, TypeError, RuntimeError, OSError) as e:
            raise CodecLoadError(f"the {part} in {path} ({spec_file} + {weights_file}) cannot "
                                 f"be loaded: {e}") from e
        setattr(snac, part, module)
    return snac, config


def _snac_from_hub(repo_id: str) -> tuple[SNAC, dict]:
    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(repo_id=repo_id, filename="config.json")
        weights_file = hf_hub_download(repo_id=repo_id, filename="pytorch_model.bin")
    except Exception as e:  # network, auth, missing repo: all mean "cannot load this id"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CodecLoadError(
            f"could not fetch the codec {repo_id!r} from the Hugging Face hub "
            f"({type(e).__name__}: {reason}). If this machine is offline: run once where the hub "
            "is reachable (the files are cached; HF_HUB_OFFLINE=1 then uses the cache), or "
            "point at a local codec directory with config.json + pytorch_model.bin (or "
            "model.safetensors), e.g. the shipped weights/demo/codec; a DiT must be served "
            "with the codec whose tokens it was trained on."
        ) from e
    config = json.loads(Path(config_file).read_text())
    snac = SNAC(**config)
    snac.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    return snac, config


def save_readable_safetensors(state: dict, path: str | os.PathLike, **kwargs) -> None:
    """safetensors' `save_file`, then mode 0644: it creates files 0600, which a container's
    non-root user cannot read from a read-only weights mount."""
    from safetensors.torch import save_file

    save_file(state, str(path), **kwargs)
    os.chmod(path, 0o644)


def save_snac(snac: SNAC, config: dict, out_dir: str | os.PathLike,
              dtype: torch.dtype | None = None) -> Path:
    """Write a directory that both `Codec.load` and `snac.SNAC.from_pretrained` accept:
    config.json + pytorch_model.bin + model.safetensors. Each file goes to a temp name and is
    renamed, so a crash never leaves a half-written export that later loads as garbage.
    dtype=torch.float16 halves the files (a shipped snapshot); loading casts back to fp32.

    A codec whose decoder is not SNAC's (config["decoder"]) writes it to decoder.json +
    decoder.safetensors; the SNAC files then hold the encoder and quantiser with a tiny
    placeholder SNAC decoder (untrained, seeded), so `snac.SNAC.from_pretrained` still loads
    them for tokenising while `Codec.load` decodes with the real decoder. An encoder that is not
    SNAC's (config["encoder"]) goes to encoder.json + encoder.safetensors the same way, with a
    placeholder SNAC encoder: such a codec tokenises only through `Codec.load`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cast = lambda v: v.detach().cpu().to(dtype or v.dtype).contiguous()  # noqa: E731
    state = {k: cast(v) for k, v in snac.state_dict().items()}
    tmp = out / ".tmp-export"
    for part, (spec_file, weights_file) in REPLACED_PARTS.items():
        if not config.get(part):
            for name in (spec_file, weights_file):  # overwriting an export that had one
                (out / name).unlink(missing_ok=True)
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            placeholder = getattr(SNAC(**snac_kwargs(config)), part).state_dict()
        module = getattr(snac, part)
        state = {k: v for k, v in state.items() if not k.startswith(f"{part}.")}
        state.update({f"{part}.{k}": cast(v) for k, v in placeholder.items()})
        save_readable_safetensors({k: cast(v) for k, v in module.state_dict().items()},
                                  tmp.with_suffix(".part"))
        os.replace(tmp.with_suffix(".part"), out / weights_file)
        # the whole spec, defaults included: the files say what they are without the code
        tmp.with_suffix(".pjson").write_text(json.dumps(_part_builders(part)[1](module),
                                                        indent=2))
        os.replace(tmp.with_suffix(".pjson"), out / spec_file)
    tmp.with_suffix(".json").write_text(json.dumps(snac_kwargs(config), indent=2))
    os.replace(tmp.with_suffix(".json"), out / "config.json")
    torch.save(state, tmp.with_suffix(".bin"))
    os.replace(tmp.with_suffix(".bin"), out / "pytorch_model.bin")
    save_readable_safetensors(state, tmp.with_suffix(".safetensors"))
    os.replace(tmp.with_suffix(".safetensors"), out / "model.safetensors")
    return out


# ----------------------------------------------------------------------------- DiT
def save_pretrained(dit: DiT, out_dir: str | os.PathLike, extra: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` + `config.json` ({"dit": asdict(config), **extra}); `dtype`
    (e.g. torch.float16, half the size) converts the floating-point tensors on the way."""
    extra = dict(extra or {})
    if "dit" in extra:
        raise ValueError("extra must not contain 'dit': that key holds the model config")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             .detach().cpu().contiguous() for k, v in dit.state_dict().items()}
    save_readable_safetensors(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {"dit": asdict(dit.config), **extra}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def read_dit_config(path: str | os.PathLike) -> dict:
    """The checkpoint's config.json as a dict (FileNotFoundError / ValueError with the path)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a DiT checkpoint: no {CONFIG_FILE}")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("dit"), dict):
        raise ValueError(f"{file} has no 'dit' model config")
    return config


def load_dit(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> DiT:
    """Rebuild a DiT from a `save_pretrained` directory."""
    from safetensors.torch import load_file

    config = DiTConfig.from_dict(read_dit_config(path)["dit"])
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has a config but no {WEIGHTS_FILE}")
    with torch.device("meta"):  # skip the random init: every tensor comes from the file
        dit = DiT(config)
    try:
        dit.load_state_dict(load_file(str(weights)), strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"weights in {path} do not match its config: {e}") from e
    return dit.to(device=device, dtype=dtype).eval()
