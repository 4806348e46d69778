"""The lab tests share one lab: brought up once per session and ALWAYS taken down (failure, Ctrl-C, crash).

Needs root (network, PID and mount namespaces) and the Debian packages from the Makefile; skips with the reason
otherwise. A lab that was already up before the session is not ours: the tests skip instead of touching it.
"""

from __future__ import annotations

import atexit
import os
import signal
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
LAB_YAML = REPO / "examples" / "lab.yaml"

_ours = {"up": False}


def _teardown() -> None:
    if _ours["up"]:
        from ha.lab import lab as labmod

        keep = os.environ.get("SIPHA_LAB_KEEP_LOGS")  # a directory: the hosts' logs outlive the lab there
        labmod.down(echo=lambda _m: None, keep_logs=Path(keep) if keep else None)
        _ours["up"] = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # test_deploy_lab.py brings up its own bare lab (the machine has one lab at a time) and takes it down; the
    # session lab below stays up until the session ends, so that module must run before any test that uses it.
    items.sort(key=lambda item: item.path.name != "test_deploy_lab.py")  # stable: file order otherwise kept
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="the lab needs root (network, PID and mount namespaces); run as root")
        for item in items:
            if item.get_closest_marker("lab") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def lab() -> Any:
    """The running lab's spec; the lab is up for the whole session and down at its end, whatever happens."""
    from ha.lab import lab as labmod
    from ha.lab.node import LabError

    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    if labmod.load_spec() is not None:
        pytest.skip("a lab is already up and is not this session's: `sipha lab down` first")
    # The agents Pacemaker runs must be this checkout's before the CIB is built (the lab leaves an ocf:sipha
    # resource out when its agent is not installed), whichever test file runs first.
    import subprocess

    inst = subprocess.run(["make", "-s", "install-agents"], cwd=REPO, capture_output=True, text=True, timeout=120)
    if inst.returncode != 0:
        pytest.fail(f"make install-agents: {inst.stderr.strip()[-300:]}")
    atexit.register(_teardown)  # also on an interpreter exit that skips fixture finalizers
    previous = signal.signal(signal.SIGTERM, lambda *_: (_teardown(), os._exit(143)))
    _ours["up"] = True  # from here on any partial lab is ours to remove
    try:
        seconds = labmod.up(LAB_YAML, echo=lambda m: print(m, flush=True))
    except LabError as exc:
        _teardown()
        missing = "missing package" in str(exc)
        (pytest.skip if missing else pytest.fail)(f"lab up: {exc}")
    except BaseException:
        _teardown()
        raise
    spec = labmod.load_spec()
    spec["up_seconds"] = seconds
    try:
        yield spec
    finally:
        _teardown()
        signal.signal(signal.SIGTERM, previous)
