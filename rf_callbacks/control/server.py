"""The control socket: `<output_dir>/control.sock`, a Unix-domain socket only its owner can open (mode 0600).

Protocol: one JSON object per line in, one JSON object per line out. `{"op": "stop", "run": "b"}` ->
`{"ok": true, "run": "b"}`; any malformed request (not JSON, not an object, unknown op, wrong types, a line over
64 KiB) gets `{"ok": false, "error": "..."}` and changes nothing. Each connection is served by its own thread; the
server survives any input and is removed when training ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..ops import MAX_REQUEST_BYTES

logger = logging.getLogger(__name__)
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes; longer paths are bound elsewhere and linked


class ControlServer:
    """Serves `handle(request) -> reply` over a Unix socket.

    Args:
        path (`str` or `os.PathLike`): Where the socket appears (`<output_dir>/control.sock`).
        handle (`Callable[[Any], dict]`): Answers one decoded request; may raise, which becomes an error reply.
    """

    def __init__(self, path: str | os.PathLike, handle: Callable[[Any], dict[str, Any]]):
        self.path = Path(path)
        self.handle = handle
        self._socket: socket.socket | None = None
        self._bound: Path | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    def start(self) -> None:
        self._remove_stale()
        bound = self.path
        if len(str(bound.resolve())) > _MAX_SOCKET_PATH:
            digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:16]
            bound = Path(tempfile.gettempdir()) / f"rf-callbacks-{digest}.sock"
            bound.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)  # the socket file is created 0600: no window where others could connect
        try:
            server.bind(str(bound))
        finally:
            os.umask(previous)
        os.chmod(bound, 0o600)
        if bound != self.path:
            self.path.symlink_to(bound)
        server.listen(64)
        server.settimeout(0.2)
        self._socket, self._bound = server, bound
        self._closing.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="rf-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        for path in {self.path, self._bound}:
            if path is not None and (path.is_symlink() or path.exists()):
                path.unlink(missing_ok=True)
        self._socket = self._thread = None

    def _remove_stale(self) -> None:
        """A socket file left by a killed process would make `bind` fail; one that still answers is in use."""
        if not (self.path.exists() or self.path.is_symlink()):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            target = self.path.resolve() if self.path.is_symlink() else None
            self.path.unlink(missing_ok=True)
            if target is not None:
                target.unlink(missing_ok=True)
        else:
            raise RuntimeError(f"another training is already running with its control socket at {self.path}")
        finally:
            probe.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            if not _same_user(connection):
                _send(connection, {"ok": False, "error": "permission denied: not the owner of this training"})
                return
            connection.settimeout(10)
            buffer = b""
            while not self._closing.is_set():
                try:
                    data = connection.recv(65536)
                except (TimeoutError, OSError):
                    return
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip() and not _send(connection, self.answer(line)):
                        return
                if len(buffer) > MAX_REQUEST_BYTES:
                    _send(connection, {"ok": False, "error": f"request over {MAX_REQUEST_BYTES} bytes"})
                    return

    def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one raw request line; never raises."""
        if len(line) > MAX_REQUEST_BYTES:
            return {"ok": False, "error": f"request over {MAX_REQUEST_BYTES} bytes"}
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as error:
            return {"ok": False, "error": f"not valid JSON: {error}"}
        try:
            return self.handle(request)
        except ValueError as error:  # OpError included: the request was refused
            return {"ok": False, "error": str(error)}
        except Exception as error:  # the server must survive anything a request triggers
            logger.exception("control request failed")
            return {"ok": False, "error": f"internal error: {type(error).__name__}: {error}"}


def _same_user(connection: socket.socket) -> bool:
    try:
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):  # not Linux: the 0600 file mode is the guard
        return True
    _, uid, _ = struct.unpack("3i", credentials)
    return uid == os.getuid()


def _send(connection: socket.socket, reply: dict[str, Any]) -> bool:
    try:
        connection.sendall(json.dumps(reply, default=str).encode() + b"\n")
        return True
    except OSError:
        return False
