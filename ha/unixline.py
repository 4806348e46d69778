"""One line out, one line back, over a unix stream socket: the local control protocol of the lab supervisor and
the coordinator service. Stdlib only, so resource agents may import it."""

from __future__ import annotations

import socket
from pathlib import Path


def exchange(path: str | Path, line: bytes, timeout: float) -> bytes:
    """Send ``line`` (newline-terminated) and return the reply read up to its newline or EOF.

    ``timeout`` applies to the connect and to each read. Raises OSError; parsing the reply is the caller's.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(line)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf
