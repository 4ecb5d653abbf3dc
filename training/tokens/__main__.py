"""`python -m training.tokens --audio DIR --out DIR`: tokenise a folder of audio (tokenizer.py)."""

import sys

from training.tokens.tokenizer import main

sys.exit(main())
