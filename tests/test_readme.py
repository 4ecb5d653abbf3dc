"""What a newcomer reads first: the README's opening and the commands it gives to copy."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_it_opens_with_what_it_does_the_two_commands_and_the_quality_today():
    intro, first_block, after = re.split(r"```bash\n|```\n", README, maxsplit=2)
    assert "continues and edits music" in intro and "SNAC" in intro
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make serve", "make test"]
    quality = " ".join(after.strip().split("\n\n")[0].split())
    assert quality.startswith("**Quality today:**") and "no recognisable notes" in quality
    assert len(re.findall(r"[.;:] [A-Z]", quality)) <= 1  # one sentence, not a report
    # The figures live in the cards and docs/benchmarks.md, which it links.
    assert "docs/benchmarks.md" in after and "MODEL_CARD.md" in after
    for target in re.findall(r"\]\(([^)#]+)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_no_command_writes_into_the_shipped_weights():
    for block in _blocks(README):
        for line in block.splitlines():
            code = line.split("#")[0]
            assert not re.search(r"(export|--out|-o)\s+\S*\s*weights/demo", code), line
            assert not re.search(r"export \S+ weights/demo", code), line


def test_tokenising_uses_the_codec_the_shipped_dit_was_trained_on():
    tokenise = [line for block in _blocks(README) for line in block.splitlines()
                if "training.tokens" in line]
    assert tokenise and all("--codec weights/demo/codec" in line for line in tokenise)
    assert "A DiT only works with the codec it was trained on" in " ".join(README.split())
    # The train commands read the tokens that line writes.
    out = re.search(r"--out (\S+)", tokenise[0]).group(1)
    trains = [line for block in _blocks(README) for line in block.splitlines()
              if "training/train.py" in line and "train_codec" not in line]
    assert trains and all(f"--data.tokens {out}" in line for line in trains), trains
    assert any("--config training/configs/dit_demo.toml" in line for line in trains)
