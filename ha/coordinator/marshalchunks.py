"""Big marshal payloads written and read a chunk at a time: a header object that lists the chunks' sizes, then the
chunks, each its own marshal object.

Why: one ``marshal.dumps`` of 100k rows or keys holds the GIL for 50-80 ms in a single call, a stall of every
other thread of the coordinator (the watch's passes, the proxy's pushes) in each node cache save; packed in
chunks, with the caller's pause between them, no single call is long. Used by the node cache's view
(:mod:`ha.coordinator.nodecache`) and the live table's keys (:mod:`ha.coordinator.livetable`).
"""

from __future__ import annotations

import io
import marshal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def dump_chunks(items: Sequence[T], per: int, make: Callable[[Sequence[T]], Any],
                pause: Callable[[], None] | None = None) -> list[bytes]:
    """``items`` marshalled ``per`` at a time (``make`` turns a slice into the chunk's object), ``pause`` called
    between two chunks. The caller writes a header with ``[len(c) for c in chunks]`` first, then the chunks."""
    out = []
    for i in range(0, len(items), per):
        if pause is not None and i:
            pause()
        out.append(marshal.dumps(make(items[i:i + per])))
    return out


def load_chunks(raw: bytes, sizes: Sequence[int]) -> Iterator[Any]:
    """The chunks that follow the header (the first marshal object of ``raw``), given their sizes. ``loads``
    ignores what follows an object but does not say where it ended; ``load`` from a file object does, reading
    exactly one object, ~15x slower: used on the header only."""
    f = io.BytesIO(raw)
    marshal.load(f)  # noqa: S302 - our own root-only files
    at, view = f.tell(), memoryview(raw)
    for size in sizes:
        yield marshal.loads(view[at:at + size])  # noqa: S302
        at += size


__all__ = ["dump_chunks", "load_chunks"]
