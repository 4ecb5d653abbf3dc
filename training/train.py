"""Train the DiT, the documented way: `python training/train.py [--config FILE] [--key value ...]`.

The same as `snac-dit-train` and `python -m training.dit.cli`; the code is training/dit/cli.py.
"""

import sys

try:
    from training.dit.cli import main
except ModuleNotFoundError as e:  # run from a checkout that was never installed
    if e.name not in ("training", "model", "audio"):
        raise
    sys.exit("error: the snac-dit package is not installed in this Python; run `make install` "
             "(or `pip install -e .`) in the repository, then use that environment's python")

if __name__ == "__main__":
    sys.exit(main())
