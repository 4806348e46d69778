"""A caller's-eye SIP OPTIONS prober for the lab (stdlib only; the drill tool grows out of it later).

``options_once`` sends one OPTIONS and waits for the matching answer. ``Prober`` sends one OPTIONS every
``interval`` seconds from one UDP socket and records, per probe, when it was sent and whether (and when) an
answer with its Call-ID came back; ``longest_gap`` is the longest time during which no probe got an answer,
measured from the send time of the last answered probe before the outage to that of the first after it.
Run it with its socket in the client's network namespace (``ha.lab.node.in_netns``).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field


def _options(target: str, port: int, local: tuple[str, int], call_id: str, cseq: int) -> bytes:
    branch = "z9hG4bK" + secrets.token_hex(8)
    return (
        f"OPTIONS sip:{target}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:prober@{local[0]}>;tag={secrets.token_hex(4)}\r\n"
        f"To: <sip:{target}:{port}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} OPTIONS\r\n"
        "User-Agent: sipha-lab-prober\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _call_id(data: bytes) -> str | None:
    for line in data.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"call-id", b"i"):
            return value.strip().decode(errors="replace")
    return None


def _status(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def options_once(target: str, port: int = 5060, timeout: float = 0.5) -> tuple[bool, str]:
    """One OPTIONS; (True, "SIP/2.0 200 OK in 1.2 ms") or (False, why)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((target, port))
            call_id = secrets.token_hex(8) + "@sipha-lab"
            t0 = time.monotonic()
            s.send(_options(target, port, s.getsockname(), call_id, 1))
            deadline = t0 + timeout
            while True:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                data = s.recv(65535)
                if _call_id(data) == call_id and data.startswith(b"SIP/2.0 "):
                    return True, f"{_status(data)} in {(time.monotonic() - t0) * 1000:.1f} ms"
        except TimeoutError:
            return False, f"no answer within {timeout * 1000:.0f} ms"
        except OSError as exc:
            return False, exc.strerror or str(exc)


@dataclass
class Prober:
    target: str
    port: int = 5060
    interval: float = 0.02
    sent: dict[str, float] = field(default_factory=dict)  # call-id -> send time
    answered: dict[str, float] = field(default_factory=dict)  # call-id -> answer time
    order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))  # noqa: S104 - inside the client namespace
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _send_loop(self, duration: float) -> None:
        local = (self.sock.getsockname()[0], self.sock.getsockname()[1])
        t0 = time.monotonic()
        n = 0
        while not self._stop.is_set() and time.monotonic() - t0 < duration:
            n += 1
            cid = f"{n}-{secrets.token_hex(4)}@sipha-lab"
            self.sent[cid] = time.monotonic()
            self.order.append(cid)
            # e.g. no route for a moment: counts as unanswered
            with contextlib.suppress(OSError):
                self.sock.sendto(_options(self.target, self.port, local, cid, n), (self.target, self.port))
            nxt = t0 + n * self.interval
            time.sleep(max(0.0, nxt - time.monotonic()))

    def _recv_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except (TimeoutError, OSError):
                continue
            cid = _call_id(data)
            if cid in self.sent and data.startswith(b"SIP/2.0 2") and cid not in self.answered:
                self.answered[cid] = time.monotonic()

    def start(self, duration: float) -> None:
        self._threads = [threading.Thread(target=self._send_loop, args=(duration,), daemon=True),
                         threading.Thread(target=self._recv_loop, daemon=True)]  # fmt: skip
        for t in self._threads:
            t.start()

    def wait(self, grace: float = 0.5) -> None:
        self._threads[0].join()
        time.sleep(grace)
        self._stop.set()
        self._threads[1].join()
        self.sock.close()

    def stop(self) -> None:
        self._stop.set()

    def report(self) -> dict[str, float | int]:
        """longest_gap_ms: between the sends of consecutive answered probes, the longest."""
        answered_times = [self.sent[c] for c in self.order if c in self.answered]
        gaps = [b - a for a, b in itertools.pairwise(answered_times)]
        longest = max(gaps, default=0.0)
        lost = len(self.order) - len(self.answered)
        return {"sent": len(self.order), "answered": len(self.answered), "unanswered": lost,
                "longest_gap_ms": round(longest * 1000, 1)}  # fmt: skip
