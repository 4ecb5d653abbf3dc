"""`python -m server`: serve on $HOST:$PORT (default 0.0.0.0:8000) with settings from SNAC_DIT_*.

Refuses to start, with instructions, when the weights are missing: never serve noise silently.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    ap.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    ap.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    from server.settings import Settings, missing_weights_message

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"invalid SNAC_DIT_* settings:\n{e}", file=sys.stderr)
        return 2
    message = missing_weights_message(settings)
    if message:
        print(message, file=sys.stderr)
        return 2

    import uvicorn

    from server.app import create_app

    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
