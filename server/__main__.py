"""`python -m server`: serve on $HOST:$PORT (default 127.0.0.1:8000) with settings from SNAC_DIT_*.

Listening beyond loopback is explicit (`HOST=0.0.0.0`) and warns when no API key is set.

Refuses to start, with instructions, when the weights are missing: never serve noise silently.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from pydantic import ValidationError


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def exposure_warning(host: str, has_api_key: bool) -> str | None:
    if is_loopback(host) or has_api_key:
        return None
    return (
        f"WARNING: listening on {host}, beyond this machine, with no API key: anyone who can "
        "reach this port can run the model. Set SNAC_DIT_API_KEY (clients then send "
        "'Authorization: Bearer KEY'), or serve on loopback (HOST=127.0.0.1, the default)."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    ap.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
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
    warning = exposure_warning(args.host, settings.api_key is not None)
    if warning:
        print(warning, file=sys.stderr)
    message = missing_weights_message(settings)
    if message:
        print(message, file=sys.stderr)
        return 2

    import uvicorn

    from model.weights import CodecLoadError
    from server.app import create_app, load_engine
    from server.codec_check import CodecMismatch

    # Load before serving, so a codec that cannot be fetched (offline hub), one the DiT was not
    # trained on, or weights that do not fit are one clear paragraph and exit status 2, not a
    # startup traceback.
    try:
        engine = load_engine(settings)
    except CodecMismatch as e:
        print(e, file=sys.stderr)
        return 2
    except (CodecLoadError, ValueError, OSError) as e:
        print(f"snac-dit server cannot start: {e}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings, engine=engine), host=args.host, port=args.port,
                log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
