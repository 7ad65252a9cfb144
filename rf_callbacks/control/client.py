"""Client side of the control socket; imports only the standard library (the CLI must answer in well under 1 s)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


class NoTraining(RuntimeError):
    """No training is running in the folder (no control socket, or nobody answers on it)."""


def socket_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "control.sock"


def request(output_dir: str | os.PathLike, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the training running in `output_dir` and return its reply.

    Raises:
        `NoTraining`: nothing is listening there.
    """
    path = socket_path(output_dir)
    if not (path.exists() or path.is_symlink()):
        raise NoTraining(f"no training is running in {output_dir} (no {path.name} there)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as error:
            raise NoTraining(f"no training is running in {output_dir} ({path.name} does not answer)") from error
        reply = b""
        try:
            connection.sendall(json.dumps(message).encode() + b"\n")
            while not reply.endswith(b"\n"):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, BrokenPipeError) as error:  # the server closed as training ended
            raise NoTraining(f"the training in {output_dir} has ended") from error
    if not reply:
        raise NoTraining(f"the training in {output_dir} closed the connection without answering")
    return json.loads(reply)
