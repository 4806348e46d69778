"""The cluster's own timeline of a drill, read from Pacemaker's and Corosync's logs on each node.

Why: the caller's-eye gap says how long; these events say where the time went (link down, new membership,
fencing, the VIP's start) -- the design notes' "where a hard-kill second goes" came from exactly these lines.

Pure text parsing. Log lines carry local wall-clock times without a year (Pacemaker: milliseconds,
``Nov 24 20:46:55.595 node2 pacemaker-controld [30] (fn) notice: ...``; Corosync: seconds unless its
``timestamp: hires`` is set, ``Nov 24 20:46:49 [2] node2 corosync notice [TOTEM ] ...``). The drill maps them
onto its monotonic clock with the offset it took at the start (``time.time() - time.monotonic()``).
The message patterns are those of Pacemaker 2.1.5 / Corosync 3.1.7 (Debian 12).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

_STAMP = re.compile(r"^(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d)(?P<frac>\.\d+)?\s")

# (pattern, how to say it); groups are substituted in order.
PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\[KNET *\] link: host: (\d+) link: \d+ is down"), "knet: link to node id {0} down"),
    (re.compile(r"\[TOTEM *\] A new membership \(([^)]+)\) was formed\.(?: Members left: ([\d ]+))?"),
     "corosync: new membership {0} (left: {1})"),
    (re.compile(r"\[QUORUM\] This node is within the non-primary component"), "corosync: quorum lost here"),
    (re.compile(r"\[QUORUM\] This node is within the primary component"), "corosync: quorate"),
    (re.compile(r"Node (\S+) state is now lost"), "pacemaker: {0} lost"),
    (re.compile(r"Requesting fencing \((\w+)\) (?:of|targeting) node (\S+)"), "pacemaker: fencing {1} ({0}) requested"),
    (re.compile(r"Peer (\S+) was terminated \((\w+)\) by (\S+)"), "pacemaker: {0} fenced ({1}) by {2}"),
    (re.compile(r"Initiating (start|stop) operation (vip-[\w.-]+?)_(?:start|stop)_0 (?:locally )?on (\S+)"),
     "pacemaker: {1} {0} initiated on {2}"),
    (re.compile(r"Result of (start|stop) operation for (vip-[\w.-]+) on (\S+): (\w+)"),
     "pacemaker: {1} {0} on {2}: {3}"),
)  # fmt: skip


def line_time(line: str, year: int) -> float | None:
    """Epoch seconds of a log line's local timestamp, or None when the line has none."""
    m = _STAMP.match(line)
    if not m:
        return None
    try:
        st = time.strptime(f"{year} {m['mon']} {m['day']} {m['hms']}", "%Y %b %d %H:%M:%S")
    except ValueError:
        return None
    return time.mktime(st) + (float(m["frac"]) if m["frac"] else 0.0)


def events(lines: Iterable[str], since: float, until: float, year: int | None = None,
           node: str = "") -> list[tuple[float, str]]:  # fmt: skip
    """(epoch, what) for every interesting line stamped within [since, until]."""
    year = year or time.localtime(since).tm_year
    out: list[tuple[float, str]] = []
    seen: dict[str, float] = {}
    for line in lines:
        t = line_time(line, year)
        if t is None or not since <= t <= until:
            continue
        for pattern, say in PATTERNS:
            m = pattern.search(line)
            if m:
                what = say.format(*(g.strip() if g else "-" for g in m.groups()))
                stamp = _STAMP.match(line)
                if stamp and not stamp["frac"]:
                    # Corosync's default stamps stop at the second: the event happened up to 1 s after t.
                    what += " (logged to the second)"
                what = f"{node}: {what}" if node else what
                if abs(seen.get(what, -10.0) - t) > 0.1:  # one daemon logs the same change several times
                    out.append((t, what))
                seen[what] = t
                break
    return sorted(out, key=lambda e: e[0])  # stable: lines of one second keep their log order


def to_monotonic(evs: Iterable[tuple[float, str]], wall_minus_mono: float) -> list[tuple[float, str]]:
    return [(t - wall_minus_mono, what) for t, what in evs]


__all__ = ["PATTERNS", "events", "line_time", "to_monotonic"]
