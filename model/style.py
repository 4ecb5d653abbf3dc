"""Style actions: one continuous style vector per chunk, learned without labels (issue 37).

A chunk's token embeddings (every level, the DiT's own embedding table) are pooled by one
attention head with a learned query; the pooled summary is scored against K learned style
embeddings, and the style vector is the softmax-weighted mix of those embeddings:

    x (B, N, d), valid (B, N)  --pool-->  p (B, d)  --scores vs E (K, d)-->  w (B, K)
    style = w @ E  (B, d)

After a warm-up the softmax keeps only the top-k scores (`sparse=True`), so each chunk is a mix
of few styles and each style embedding stays a recognisable knob: action k is E[k] (one-hot w).
The DiT adds a bias-free, zero-initialised projection of the style to the conditioning of the
target segments (model/dit.py). A style of all zeros is therefore "no style", exactly today's
model; that is what style dropout trains and what classifier-free guidance on the style uses.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor


class StyleActions(nn.Module):
    def __init__(self, d: int, n_styles: int, topk: int):
        super().__init__()
        if not 1 <= topk <= n_styles:
            raise ValueError(f"style top-k must lie in [1, {n_styles}], got {topk}")
        self.n_styles, self.topk = n_styles, topk
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(d))  # the one pooling head's learned query
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.to_style = nn.Linear(d, d)  # pooled summary -> the style embeddings' space
        self.styles = nn.Parameter(torch.zeros(n_styles, d))  # E: the K actions

    def initialize_weights(self) -> None:
        for lin in (self.key, self.value, self.to_style):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        # Zero query: uniform pooling (a mean of the chunk) at init. Distinct random styles, so
        # the scores differ and each style gets its own gradient from the first step.
        nn.init.zeros_(self.query)
        nn.init.normal_(self.styles, std=1.0)

    def weights(self, x: Tensor, valid: Tensor | None = None, sparse: bool = True) -> Tensor:
        """Mixing weights (B, K) of token embeddings x (B, N, d); valid (B, N) marks real tokens.
        sparse: keep the top-k scores only (after the training warm-up, and at inference)."""
        B, N, d = x.shape
        h = self.norm(x)
        att = (self.key(h) @ self.query) / math.sqrt(d)  # (B, N)
        if valid is not None:
            att = att.masked_fill(~valid, -math.inf)
        pooled = torch.einsum("bn,bnd->bd", att.softmax(-1), self.value(h))  # (B, d)
        scores = self.to_style(pooled) @ self.styles.t() / math.sqrt(d)  # (B, K)
        if sparse and self.topk < self.n_styles:
            kth = scores.topk(self.topk, dim=-1).values[:, -1:]  # (B, 1)
            scores = scores.masked_fill(scores < kth, -math.inf)
        return scores.softmax(-1)

    def forward(self, x: Tensor, valid: Tensor | None = None, sparse: bool = True) -> Tensor:
        """Style vectors (B, d) of token embeddings x (B, N, d)."""
        return self.weights(x, valid, sparse) @ self.styles

    def action(self, k: Tensor) -> Tensor:
        """Style vectors (B, d) of chosen actions k (B,): the style embeddings themselves."""
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.n_styles):
            raise ValueError(f"style actions are 0..{self.n_styles - 1}, got {k.tolist()}")
        return self.styles[k]


# What each action means, measured after training (`python -m training.dit.actions`), beside the
# DiT's weights: descriptions for /info, and one example chunk per action.
ACTIONS_FILE = "style_actions.json"
EXAMPLES_DIR = "actions"


def example_file(dit_dir: str | Path, action: int) -> Path:
    return Path(dit_dir) / EXAMPLES_DIR / f"action-{action}.ogg"


def weights_digest(dit_dir: str | Path) -> str | None:
    """sha256 of the DiT's weight file: the notes describe these weights, not a later export."""
    from model.weights import WEIGHTS_FILE

    path = Path(dit_dir) / WEIGHTS_FILE
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_action_notes(dit_dir: str | Path, k: int) -> tuple[list[dict] | None, str | None]:
    """(per-action notes, None), or (None, why they are not used) when the DiT's directory has
    no usable ACTIONS_FILE: (None, None) when there is none at all. Notes of other weights (a
    later export into the same directory) are not used."""
    path = Path(dit_dir) / ACTIONS_FILE
    if not path.is_file():
        return None, None
    try:
        notes = json.loads(path.read_text())
        actions = notes.get("actions")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        return None, f"{path}: unreadable ({e}); the actions stay undescribed"
    if notes.get("weights_sha256") != weights_digest(dit_dir):
        return None, (f"{path} describes other weights than {Path(dit_dir).name}'s (exported "
                      "again since?); the actions stay undescribed: re-run "
                      "python -m training.dit.actions")
    if (not isinstance(actions, list) or len(actions) != k
            or [a.get("action") if isinstance(a, dict) else None for a in actions] != list(range(k))):
        return None, (f"{path} does not describe this model's {k} actions (another model's?); "
                      "they stay undescribed: re-run python -m training.dit.actions")
    return actions, None
