"""Train or fine-tune a SNAC codec: `python training/train_codec.py --config FILE [--key value]`.

The same as `snac-dit-train-codec` and `python -m training.codec.cli`; the code is
training/codec/cli.py (docs/codec-training.md).
"""

import sys

try:
    from training.codec.cli import main
except ModuleNotFoundError as e:  # a checkout that was never installed, or a missing dependency
    sys.exit(f"error: {e}; install the package first: make install (or pip install -e .)")

if __name__ == "__main__":
    sys.exit(main())
