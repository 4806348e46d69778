"""kazoo clients whose I/O wait does not create and close an epoll instance every time it waits.

Why: kazoo 2.11's threading handler waits through ``selector_select``, which builds a ``selectors.DefaultSelector``
(``epoll_create``, ``epoll_ctl`` per socket, ``close``) for every wait: before each reply it reads, each request
it writes, and each turn of its connection loop. py-spy on the lab's active coordinator at 500 REGISTER/s
(2026-11-25) put a quarter of its CPU there (the selector's ``__init__``, ``register`` and ``close``), and as
much on the standby's; on a 2-core machine running the whole lab, that CPU is the replication lag's tail.
``select.poll`` has no descriptor limit either (the reason kazoo left ``select.select``) and needs no kernel
object: one ``poll`` system call per wait.
"""

from __future__ import annotations

import select
from collections.abc import Sequence
from typing import Any

from kazoo.client import KazooClient
from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.handlers.utils import fileobj_to_fd

_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR | select.POLLNVAL
_WRITABLE = select.POLLOUT | select.POLLHUP | select.POLLERR | select.POLLNVAL


class PollHandler(SequentialThreadingHandler):
    """kazoo's own threading handler, but its ``select`` is one ``poll``. Same contract as kazoo's: the ready
    objects of ``rlist`` and ``wlist`` (a socket in error or hung up counts as ready, as with ``select``, so the
    read or write that follows raises), never any of ``xlist``; ``timeout`` in seconds, None to wait for ever."""

    name = "sequential_threading_poll"

    def select(self, rlist: Sequence[Any], wlist: Sequence[Any], xlist: Sequence[Any],
               timeout: float | None = None) -> tuple[list[Any], list[Any], list[Any]]:
        if timeout is not None:
            if not isinstance(timeout, int | float):
                raise TypeError("timeout must be a number")
            if timeout < 0:
                raise ValueError("timeout must be non-negative")
        want: dict[int, int] = {}
        for objs, mask in ((rlist, select.POLLIN | select.POLLPRI), (wlist, select.POLLOUT)):
            for obj in objs:
                fd = fileobj_to_fd(obj)
                want[fd] = want.get(fd, 0) | mask
        p = select.poll()
        for fd, mask in want.items():
            p.register(fd, mask)
        ready = dict(p.poll(None if timeout is None else timeout * 1000))
        r = [o for o in rlist if ready.get(fileobj_to_fd(o), 0) & _READABLE]
        w = [o for o in wlist if ready.get(fileobj_to_fd(o), 0) & _WRITABLE]
        return r, w, []


def new_client(hosts: str, **kwargs: Any) -> KazooClient:
    """A KazooClient on :class:`PollHandler` (the rest as ``KazooClient``'s own arguments)."""
    return KazooClient(hosts=hosts, handler=PollHandler(), **kwargs)


__all__ = ["PollHandler", "new_client"]
