"""The HTTP server: `server.app.create_app(settings)`; run with `python -m server`.

Kept import-free so `python -m server` can report missing weights without loading torch.
"""
