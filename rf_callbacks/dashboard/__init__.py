"""The local web dashboard: one page on 127.0.0.1, with a secret token, to watch and steer a running experiment.

`Dashboard(output_dir).start()` returns `http://127.0.0.1:<port>/?token=<token>`; the page lists every run (status,
chunk, step, last train and eval loss, parent), draws live loss curves, and has Stop / Resume / Delete buttons and a
clone form, all through the training's control socket. Only the standard library is imported (no torch).
"""

from __future__ import annotations

from .server import Dashboard, serve_forever

__all__ = ["Dashboard", "serve_forever"]
