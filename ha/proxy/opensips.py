"""OpenSIPS adapter: the config check, where OpenSIPS is installed.

Standard library only (resource agents import it). OpenSIPS is not packaged in Debian 12, so on the machines
sipha is developed and tested on there is no ``opensips`` binary: :func:`check_config` then returns None
*without having checked anything* (see :func:`can_check` to tell the two apart). Where the binary exists it
runs ``opensips -c -f PATH`` and returns None when OpenSIPS accepts the file, else one line saying why not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

CHECK_TIMEOUT_S = 30
_PREFIX = re.compile(r"^\s*(?:\S+\s+\S+\s+\d+:\d+:\d+\s+)?(?:\[\d+\]\s+)?(?:\w+:)?(?:core|[a-z_]+):?\s*")


def opensips_binary() -> str | None:
    return shutil.which("opensips") or next(
        (p for p in ("/usr/sbin/opensips", "/usr/local/sbin/opensips") if os.access(p, os.X_OK)), None
    )


def can_check() -> bool:
    """Whether :func:`check_config` can say anything: False where OpenSIPS is not installed."""
    return opensips_binary() is not None


def _one_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for pattern in ("parse error", "CRITICAL", "ERROR"):
        for ln in lines:
            if pattern in ln:
                return ln
    return lines[-1] if lines else "opensips -c failed without output"


def check_config(path: Path | str) -> str | None:
    """``opensips -c -f PATH``: None when accepted *or when OpenSIPS is not installed* (no claim made)."""
    binary = opensips_binary()
    if binary is None:
        return None
    path = Path(path)
    if not path.is_file():
        return f"{path}: no such file"
    try:
        proc = subprocess.run(
            [binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        return f"{path}: opensips -c did not finish within {CHECK_TIMEOUT_S} s"
    if proc.returncode == 0:
        return None
    return _one_line((proc.stdout or "") + "\n" + (proc.stderr or ""))


__all__ = ["can_check", "check_config", "opensips_binary"]
