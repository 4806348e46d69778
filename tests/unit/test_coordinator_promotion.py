"""What a node's coordinator does with its proxy's events before it knows it is active (real 3-member ensemble).

The VIP lands on the new active before its once-a-second role check promotes it; the BYEs of the calls that
outlived the failover arrive in that window (seen in the lab: 200 BYEs 0.1 s after the VIP answered). Those
dialog events are held and written at the promotion; nothing else could bring their CDRs back (reconciliation
repairs bindings only).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import conftest_zk
from conftest_zk import connect, contact, dialog

from ha.coordinator.journal import Journal
from ha.coordinator.replication import Replication
from ha.coordinator.store import ZkStore

zk_ensemble = conftest_zk.zk_ensemble
zk_client = conftest_zk.zk_client


def test_a_bye_before_the_promotion_is_billed_at_it(zk_ensemble: conftest_zk.Ensemble, tmp_path: Path) -> None:
    cluster = f"t{uuid.uuid4().hex[:8]}"
    client = connect(zk_ensemble)
    r = Replication(ZkStore(client, cluster, "node2"), "node2", Journal(tmp_path / "j.jsonl"))
    try:
        old = ZkStore(client, cluster, "node1")  # the old active wrote the confirmed call
        old.ensure_layout()
        old.bump_epoch()
        old.write([dialog(1, "held@x", from_tag="caller", to_tag="callee", created_ms=1764014460123)])
        r.start()
        # node2 is not active yet: its proxy relays the BYE of a dialog it never saw (the template's known=false).
        bye = dialog(1, "held@x", "end", node="node2", known=False, from_tag="callee", to_tag="caller",
                     created_ms=0, start_ts=0)  # fmt: skip
        reg = contact(2, "late", node="node2")  # a binding: left to the reconciliation the promotion schedules
        for ev in (bye, reg):
            r.feed(json.dumps(ev.to_json()).encode())
        assert r.flush() is None and r.store.cdrs() == ()
        said = r.promote()
        assert "1 dialog events from before the promotion" in said, said
        (cdr,) = r.store.cdrs()
        assert (cdr.callid, cdr.created_ms, cdr.start_ts, cdr.reason) == ("held@x", 1764014460123, 1764014461, "end")
        assert r.store.snapshot().dialogs == ()
        assert r.status()["carried_over"] == 1 and r.reconcile_due is not None
        # Once active, nothing is held: a second promotion writes nothing again.
        r.demote()
        assert "from before the promotion" not in r.promote()
        assert len(r.store.cdrs()) == 1
    finally:
        r.close()
        client.stop()
        client.close()
