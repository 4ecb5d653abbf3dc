"""Openly licensed audio corpora for codec and DiT training (see docs/codec-training.md)."""
