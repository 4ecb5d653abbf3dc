"""Train the DiT, the documented way: `python training/train.py [--config FILE] [--key value ...]`.

The same as `snac-dit-train` and `python -m training.dit.cli`; the code is training/dit/cli.py.
"""

import sys

try:
    from training.dit.cli import main
except ModuleNotFoundError as e:  # a checkout that was never installed, or a missing dependency
    sys.exit(f"error: {e}; install the package first: make install (or pip install -e .)")

if __name__ == "__main__":
    sys.exit(main())
