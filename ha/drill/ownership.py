"""Who holds the VIP, sampled every 10 ms on every node: the split-brain evidence of a drill.

Why netlink and not ``ip addr``: two nodes x 100 samples/s of ``ip`` would be 200 processes a second on the
machine whose timing we measure. One ``RTM_GETADDR`` dump on a netlink socket opened inside each node's network
namespace costs a few microseconds. A namespace that is recreated (a node powered on again) is noticed by its
inode and the socket re-opened.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_GETADDR = 20, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_ADDRESS, IFA_LOCAL = 1, 2
_HDR = struct.Struct("=LHHLL")
_IFA = struct.Struct("=BBBBI")
_RTA = struct.Struct("=HH")


def getaddr_request(seq: int) -> bytes:
    body = _IFA.pack(socket.AF_INET, 0, 0, 0, 0)
    return _HDR.pack(_HDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_addresses(data: bytes) -> tuple[set[str], bool]:
    """IPv4 addresses in a chunk of an RTM_GETADDR dump, and whether the dump is done."""
    out: set[str] = set()
    off = 0
    while off + _HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            break
        if kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR:
            raise OSError("netlink RTM_GETADDR error")
        if kind == RTM_NEWADDR:
            family = data[off + _HDR.size]
            a = off + _HDR.size + _IFA.size
            end = off + length
            while family == socket.AF_INET and a + _RTA.size <= end:
                rlen, rtype = _RTA.unpack_from(data, a)
                if rlen < _RTA.size:
                    break
                if rtype in (IFA_LOCAL, IFA_ADDRESS) and rlen - _RTA.size == 4:
                    out.add(socket.inet_ntoa(data[a + _RTA.size : a + rlen]))
                a += (rlen + 3) & ~3
        off += (length + 3) & ~3
    return out, False


def addresses(sock: socket.socket, seq: int = 1, timeout: float = 0.5) -> set[str]:
    """Every IPv4 address of the namespace the netlink socket was opened in."""
    sock.settimeout(timeout)
    sock.send(getaddr_request(seq))
    out: set[str] = set()
    for _ in range(64):  # a dump of a few interfaces is one or two datagrams; bounded regardless
        chunk, done = parse_addresses(sock.recv(65536))
        out |= chunk
        if done:
            return out
    return out


def netlink_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    s.bind((0, 0))
    return s


class NamespaceView:
    """The VIP seen from one node's network namespace (``/run/netns/<ns>``), re-opened when it is recreated."""

    def __init__(self, ns: str, in_netns: Callable[[str, Callable[[], socket.socket]], socket.socket]) -> None:
        self.ns = ns
        self.in_netns = in_netns
        self.sock: socket.socket | None = None
        self.inode: int | None = None
        self.seq = 0

    def holds(self, vip: str) -> bool:
        try:
            inode = os.stat(f"/run/netns/{self.ns}").st_ino
        except OSError:
            self.close()
            return False
        if inode != self.inode or self.sock is None:
            self.close()
            self.sock = self.in_netns(self.ns, netlink_socket)
            self.inode = inode
        self.seq += 1
        try:
            return vip in addresses(self.sock, self.seq)
        except OSError:
            self.close()
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class OwnershipSampler:
    """A thread sampling ``owners()`` every ``interval`` until stopped or ``max_samples`` is reached."""

    def __init__(self, owners: Callable[[], Mapping[str, bool]], interval: float = 0.01,
                 max_samples: int = 60000) -> None:  # fmt: skip
        self.owners = owners
        self.interval = interval
        self.max_samples = max_samples
        self.samples: list[tuple[float, dict[str, bool]]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vip-ownership", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        for i in range(self.max_samples):
            if self._stop.is_set():
                return
            try:
                self.samples.append((time.monotonic(), dict(self.owners())))
            except Exception:
                self.errors += 1
            self._stop.wait(max(0.0, t0 + (i + 1) * self.interval - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout=5)


__all__ = ["NamespaceView", "OwnershipSampler", "addresses", "getaddr_request", "netlink_socket", "parse_addresses"]
