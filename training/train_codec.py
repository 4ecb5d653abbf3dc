"""Train or fine-tune a SNAC codec: `python training/train_codec.py --config FILE [--key value]`.

The same as `snac-dit-train-codec` and `python -m training.codec.cli`; the code is
training/codec/cli.py (docs/codec-training.md).
"""

import sys

try:
    from training.codec.cli import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name not in ("training", "model", "audio"):
        raise
    sys.exit("error: the snac-dit package is not installed in this Python; run `make install` "
             "(or `pip install -e .`) in the repository, then use that environment's python")

if __name__ == "__main__":
    sys.exit(main())
