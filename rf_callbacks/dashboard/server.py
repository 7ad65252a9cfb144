"""The dashboard's HTTP side: one page and a small JSON API on 127.0.0.1, guarded by a secret token.

```
GET  /?token=T                    the page (index.html, self-contained: no CDN, no external request)
GET  /api/status                  the training's status          -> control op `status`
GET  /api/runs                    one row per run                -> control op `ls`
GET  /api/metrics?run=R&last=N    last N log entries per run     -> control op `metrics`
POST /api/op   {"op": "stop", "run": "b"}                       -> control ops stop / resume / delete / clone
```

`HEAD` answers as `GET` without the body; any other method (`OPTIONS`, `PUT`, ...) gets 405 with an `Allow` header.

Every request needs the token, as `?token=T` or as the `X-RF-Token` header (the page sends the header); without it
the answer is 403. The API forwards each request to the training's control socket (`<output_dir>/control.sock`) with
`"by": "dashboard"`, so the ledger records who issued an op. When no training is running the API answers 503 with
`{"ok": false, "live": false, "error": ...}` and, for `/api/runs` and `/api/metrics`, the last known data read from
the folder (`runs/*/run.json`, `ledger.jsonl`), so the page still shows a finished or crashed experiment.

Only the standard library and rf-callbacks' light modules are imported (no torch, transformers or TRL): the
dashboard starts in well under a second and can run in its own process next to a training.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from ..control.client import NoTraining, request
from ..ledger import read_ledger, results_from_dir
from ..ops import MAX_REQUEST_BYTES, OP_KINDS, OpError, parse_request

logger = logging.getLogger(__name__)

TOKEN_HEADER = "X-RF-Token"
# The page may run its own inline script and style and talk to this server; nothing else (no CDN, no frames).
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_FULL_HISTORY = 1_000_000  # `last` that means "everything"
_ALLOW = "GET, HEAD, POST"


class Dashboard:
    """The dashboard of the experiment in `output_dir`, served on `http://127.0.0.1:<port>/?token=<token>`.

    Args:
        output_dir (`str` or `os.PathLike`): The experiment's `output_dir` (where `control.sock`, `ledger.jsonl` and
            `runs/` are). It need not exist yet: the page waits for a training to start there.
        port (`int`, *optional*, defaults to `0`): The port to listen on, on 127.0.0.1 only; `0` picks a free one.
        token (`str`, *optional*): The secret every request must carry; default `secrets.token_urlsafe(24)`.

    Example:

    ```python
    dashboard = Dashboard("out")
    print("Dashboard:", dashboard.start())   # http://127.0.0.1:40123/?token=...
    ...
    dashboard.stop()
    ```
    """

    def __init__(self, output_dir: str | os.PathLike, port: int = 0, token: str | None = None):
        if token is not None and not token:
            raise ValueError("token must be a non-empty string (or None for a random one)")
        self.output_dir = Path(output_dir)
        self.port = int(port)
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self.page = resources.files(__package__).joinpath("index.html").read_bytes()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ledger_cache: tuple[tuple[int, int], list[dict[str, Any]]] | None = None
        self._ledger_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ public
    @property
    def url(self) -> str | None:
        """`http://127.0.0.1:<port>/?token=<token>` once started, else `None`."""
        if self._server is None:
            return None
        return f"http://127.0.0.1:{self._server.server_address[1]}/?token={quote(self.token, safe='')}"

    def start(self) -> str:
        """Bind 127.0.0.1, serve in a background (daemon) thread and return the URL; prints nothing.

        Raises:
            `OSError`: the port is taken (only when a `port` was given).
            `RuntimeError`: already started.
        """
        if self._server is not None:
            raise RuntimeError("the dashboard is already running")
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.dashboard = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="rf-dashboard", daemon=True)  # fmt: skip
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and free the port (safe to call twice)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------- API
    def check_token(self, given: str | None) -> bool:
        """Whether `given` is this dashboard's token (constant-time comparison)."""
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def forward(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send `message` to the training's control socket, as the dashboard.

        Raises:
            `NoTraining`: no training is running in `output_dir`.
        """
        return request(self.output_dir, {**message, "by": "dashboard"})

    def saved_runs(self) -> list[dict[str, Any]]:
        """`results()` rows rebuilt from the folder (`experiment.json`, `runs/*/run.json`, `ledger.jsonl`)."""
        if (self.output_dir / "ledger.jsonl").is_file():
            rows = results_from_dir(self.output_dir)
        else:
            rows = []
            for path in sorted(self.output_dir.glob("runs/*/run.json")):
                try:
                    row = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(row, dict) and isinstance(row.get("name"), str):
                    rows.append(row)
        # Op records (`op`, `op_applied`, ...) carry no step when issued, and a refused op may name a run that never
        # existed: the step comes from the run's last other record, and a name seen only in op records is no run.
        steps: dict[str, int] = {}
        parents: dict[str, str] = {}
        for record in self._ledger():
            name, step = record.get("run"), record.get("step")
            if not isinstance(name, str) or str(record.get("event", "")).startswith("op"):
                continue
            if isinstance(step, int):
                steps[name] = step
            if record.get("event") == "status" and record.get("parent"):
                parents[name] = record["parent"]
        kept = []
        for row in rows:
            name = row.get("name")
            if row.get("max_steps") == "?" and name not in steps:
                continue
            if not isinstance(row.get("global_step"), int):
                row["global_step"] = steps.get(name, 0)
            if not row.get("parent") and name in parents:
                row["parent"] = parents[name]
            kept.append(row)
        return kept

    def saved_metrics(self, run: str | None, last: int) -> dict[str, list[dict[str, Any]]]:
        """The last `last` log records of each run (or of `run`) from `ledger.jsonl`."""
        history: dict[str, list[dict[str, Any]]] = {}
        for record in self._ledger():
            name = record.get("run")
            if record.get("event") == "log" and isinstance(name, str) and (run is None or name == run):
                history.setdefault(name, []).append(record)
        return {name: records[-last:] for name, records in history.items()}

    def _ledger(self) -> list[dict[str, Any]]:
        """The ledger's records, re-read only when the file changed (the page polls every second)."""
        path = self.output_dir / "ledger.jsonl"
        try:
            stat = path.stat()
        except OSError:
            return []
        key = (stat.st_mtime_ns, stat.st_size)
        with self._ledger_lock:
            if self._ledger_cache is None or self._ledger_cache[0] != key:
                try:
                    self._ledger_cache = (key, read_ledger(path))
                except (OSError, UnicodeDecodeError):
                    return []
            return self._ledger_cache[1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard

    def handle_error(self, request: Any, client_address: Any) -> None:  # a dropped connection is not news
        logger.debug("dashboard request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "rf-callbacks-dashboard"
    sys_version = ""
    timeout = 30  # a client that opens a connection and sends nothing does not hold a thread for ever

    # -------------------------------------------------------------------------------------------- routing
    def do_GET(self) -> None:
        path, query = self._split()
        if path is None:
            return
        if path == "/":
            if not self.server.dashboard.check_token(query.get("token")):
                return self._reply_forbidden(page=True)
            return self._send(HTTPStatus.OK, self.server.dashboard.page, "text/html; charset=utf-8")
        if not self._authorized(query):
            return self._reply_forbidden(page=False)
        if path == "/api/status":
            return self._forward({"op": "status"}, fallback=None)
        if path == "/api/runs":
            return self._forward({"op": "ls"}, fallback=lambda: {"runs": self.server.dashboard.saved_runs()})
        if path == "/api/metrics":
            message: dict[str, Any] = {"op": "metrics"}
            run = query.get("run") or None
            if run is not None:
                message["run"] = run
            try:
                message["last"] = int(query.get("last", "50"))
            except ValueError:
                return self._error(HTTPStatus.BAD_REQUEST, "'last' must be an integer")
            if not 1 <= message["last"] <= _FULL_HISTORY:
                return self._error(HTTPStatus.BAD_REQUEST, f"'last' must be in 1..{_FULL_HISTORY}")
            saved = lambda: {"metrics": self.server.dashboard.saved_metrics(run, message["last"])}  # noqa: E731
            return self._forward(message, fallback=saved)
        return self._error(HTTPStatus.NOT_FOUND, f"no such path {path!r}")

    def do_POST(self) -> None:
        path, query = self._split()
        if path is None:
            return
        if not self._authorized(query):
            return self._reply_forbidden(page=False)
        if path != "/api/op":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {path!r}")
        body = self._read_body()
        if body is None:
            return
        try:
            message = json.loads(body)
        except (ValueError, RecursionError) as error:
            return self._error(HTTPStatus.BAD_REQUEST, f"not valid JSON: {error}")
        if not isinstance(message, dict) or message.get("op") not in OP_KINDS:
            kind = message.get("op") if isinstance(message, dict) else None
            error = f"unknown op {kind!r}; the dashboard sends {', '.join(OP_KINDS)}"
            if not isinstance(message, dict):
                error = f"the body must be a JSON object, got {type(message).__name__}"
            return self._error(HTTPStatus.BAD_REQUEST, error)
        message["by"] = "dashboard"
        try:
            parse_request(message, source="dashboard")  # field checks here too: a bad op gets 400 even offline
        except OpError as error:
            return self._error(HTTPStatus.BAD_REQUEST, str(error))
        self._forward(message, fallback=None)

    # Same routes, token checks and headers as GET; `_send` leaves out the body.
    do_HEAD = do_GET

    def do_PUT(self) -> None:
        self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use GET or POST")

    # OPTIONS too: the page is same-origin, so a CORS preflight (another site's script) must not succeed.
    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    # -------------------------------------------------------------------------------------------- helpers
    def _split(self) -> tuple[str | None, dict[str, str]]:
        try:
            parts = urlsplit(self.path)
            query = {key: values[0] for key, values in parse_qs(parts.query, max_num_fields=20).items()}
        except ValueError as error:
            self._error(HTTPStatus.BAD_REQUEST, f"bad URL: {error}")
            return None, {}
        return parts.path, query

    def _authorized(self, query: dict[str, str]) -> bool:
        return self.server.dashboard.check_token(self.headers.get(TOKEN_HEADER) or query.get("token"))

    def _reply_forbidden(self, page: bool) -> None:
        if page:
            text = "403 Forbidden: open the dashboard with the URL printed when it started (it ends in ?token=...).\n"
            return self._send(HTTPStatus.FORBIDDEN, text.encode(), "text/plain; charset=utf-8")
        self._error(HTTPStatus.FORBIDDEN, "forbidden: missing or wrong token")

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return None
        try:
            size = int(length)
        except ValueError:
            size = -1
        if size < 0:
            self._error(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
            return None
        if size > MAX_REQUEST_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_REQUEST_BYTES} bytes")
            return None
        try:
            return self.rfile.read(size)
        except OSError:
            self.close_connection = True
            return None

    def _forward(self, message: dict[str, Any], fallback: Any) -> None:
        """Answer with the control socket's reply; when no training runs, 503 plus `fallback()`'s saved data."""
        dashboard = self.server.dashboard
        try:
            reply = dashboard.forward(message)
        except NoTraining as error:
            payload: dict[str, Any] = {"ok": False, "live": False, "error": str(error)}
            if fallback is not None:
                try:
                    payload.update(fallback())
                except Exception as saved_error:  # a half-written folder must not break the page
                    logger.debug("reading saved data failed", exc_info=True)
                    payload["saved_error"] = f"{type(saved_error).__name__}: {saved_error}"
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE, payload)
        except (OSError, ValueError) as error:  # a timeout, a cut connection, a garbled reply
            return self._error(HTTPStatus.BAD_GATEWAY, f"training did not answer: {error}", live=True)
        if not isinstance(reply, dict):
            return self._error(HTTPStatus.BAD_GATEWAY, "malformed reply from the training", live=True)
        reply["live"] = True
        self._json(HTTPStatus.OK if reply.get("ok") else HTTPStatus.BAD_REQUEST, reply)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, headers, a URL over 64 KiB) as JSON too."""
        self.close_connection = True
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self._error(status, message or status.phrase)

    def _error(self, status: HTTPStatus, error: str, **extra: Any) -> None:
        self._json(status, {"ok": False, "error": error, **extra})

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        body = json.dumps(_finite(payload), default=str, allow_nan=False).encode()
        self._send(status, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Content-Security-Policy", _CSP)
            if status == HTTPStatus.METHOD_NOT_ALLOWED:
                self.send_header("Allow", _ALLOW)
            self.end_headers()
            if self.command != "HEAD":  # Content-Length still tells the size a GET would get
                self.wfile.write(body)
        except OSError:  # the client went away
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("dashboard: " + format, *args)


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities as the strings "NaN", "Infinity", "-Infinity" (JSON has no such numbers and a
    diverged run logs them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def serve_forever(output_dir: str | os.PathLike, port: int = 0) -> None:
    """Start the dashboard of `output_dir`, print `Dashboard: <url>` and serve until Ctrl-C (the CLI's entry point).

    Args:
        output_dir (`str` or `os.PathLike`): The experiment's `output_dir`.
        port (`int`, *optional*, defaults to `0`): The port on 127.0.0.1; `0` picks a free one.
    """
    dashboard = Dashboard(output_dir, port=port)
    url = dashboard.start()
    print(f"Dashboard: {url}", flush=True)
    thread = dashboard._thread
    try:
        while thread is not None and thread.is_alive():
            thread.join(timeout=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()
