"""zookeeper.auth_file against the real test ensemble: sipha's znodes closed to every other client, an open
store closed at the next start, and a bad credential file said in one line."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import conftest_zk
import pytest
from conftest_zk import contact
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE

from ha import model
from ha.coordinator import materialize, zkauth
from ha.coordinator.journal import Journal
from ha.coordinator.replication import Replication
from ha.coordinator.store import StoreUnavailable, ZkStore
from ha.zk_testing import Ensemble, started_client

zk_ensemble = conftest_zk.zk_ensemble
PASSWORD = "correct-horse-battery-staple"


def _auth(*passwords: str) -> zkauth.ZkAuth:
    return zkauth.ZkAuth(tuple(("sipha", p) for p in passwords))


@pytest.fixture
def cluster() -> str:
    return f"a{uuid.uuid4().hex[:8]}"


@pytest.fixture
def authed(zk_ensemble: Ensemble) -> Iterator[KazooClient]:
    with started_client(zk_ensemble.hosts, 2.0, **_auth(PASSWORD).client_kwargs()) as c:
        yield c


@pytest.fixture
def zk_client(zk_ensemble: Ensemble) -> Iterator[KazooClient]:
    """No credential at all: what ZooKeeper gives anyone who reaches its port (conftest_zk's clients have one)."""
    with started_client(zk_ensemble.hosts, 2.0) as c:
        yield c


def _all_paths(c: KazooClient, top: str) -> list[str]:
    out, level = [], [top]
    while level:
        out.extend(level)
        level = [f"{p}/{k}" for p in level for k in c.get_children(p)]
    return out


def test_a_closed_store_is_read_and_written_by_its_credential_only(
    authed: KazooClient, zk_client: KazooClient, zk_ensemble: Ensemble, cluster: str, tmp_path: Path
) -> None:
    """What an attacker on the cluster network would try, with no credential and with a wrong one: read a
    phone's binding, overwrite it, add one, delete one. All refused; the credential's own store works as ever."""
    s = ZkStore(authed, cluster, "node1")
    s.ensure_layout()
    s.bump_epoch()
    s.write([contact(1, "alice"), contact(2, "bob")])
    path = s.contact_path("alice", "sip:alice@198.51.100.50:5062")
    assert {r.aor for r in s.snapshot().contacts} == {"alice", "bob"}
    with started_client(zk_ensemble.hosts, 2.0, **_auth("not-the-password-at-all").client_kwargs()) \
            as wrong:
        for c in (zk_client, wrong):
            with pytest.raises(NoAuthError):
                c.get(path)
            with pytest.raises(NoAuthError):
                c.set(path, json.dumps({"aor": "alice", "contact": "sip:evil@198.51.100.66"}).encode())
            with pytest.raises(NoAuthError):
                c.create(path.rsplit("/", 1)[0] + "/evil", b"{}")
            with pytest.raises(NoAuthError):
                c.delete(s.contact_path("bob", "sip:bob@198.51.100.50:5062"))
            with pytest.raises(NoAuthError):
                c.get_children(s.root)
        # A node given another credential than the cluster's does not start replicating: it says why.
        with pytest.raises(StoreUnavailable, match="auth_file is not the credential the other nodes use"):
            ZkStore(wrong, cluster, "node2").ensure_layout()
        with pytest.raises(StoreUnavailable, match="auth_file is set on other nodes, not on this one"):
            ZkStore(zk_client, cluster, "node2").ensure_layout()
        # What the coordinator says, and keeps retrying: not started, with the cause.
        said = Replication(ZkStore(wrong, cluster, "node2"), "node2", Journal(tmp_path / "j.jsonl")).start()
        assert said == (f"replication not started: not allowed into /sipha/{cluster}: zookeeper.auth_file is not the "
                        "credential the other nodes use; will retry on tick"), said
    assert {r.aor for r in s.snapshot().contacts} == {"alice", "bob"}
    assert zk_client.get_acls("/sipha")[0] == OPEN_ACL_UNSAFE  # shared by clusters: each closes its own subtree


def test_an_open_store_is_closed_whole_at_the_first_start_with_a_credential(
    authed: KazooClient, zk_client: KazooClient, cluster: str
) -> None:
    """Bindings, tombstones, buckets and the epoch written before auth_file was set: every znode of the cluster
    gets the credential's ACL at the next ensure_layout (the top last), and later starts find nothing to do."""
    before = ZkStore(zk_client, cluster, "node1")
    before.ensure_layout()
    before.bump_epoch()
    before.write([contact(i, f"u{i}") for i in range(1, 301)])
    before.write([contact(301, "u1", "sip:u1@198.51.100.50:5062", kind="delete")])
    other = f"{cluster}x"
    ZkStore(zk_client, other, "node1").ensure_layout()  # another cluster on the same ensemble: left open
    paths = _all_paths(zk_client, before.root)
    assert len(paths) > 300 + 3 * 256

    s = ZkStore(authed, cluster, "node1")
    s.ensure_layout()
    acl = _auth(PASSWORD).acl
    assert [p for p in _all_paths(authed, s.root) if authed.get_acls(p)[0] != acl] == []
    with pytest.raises(NoAuthError):
        zk_client.get(s.contact_path("u2", "sip:u2@198.51.100.50:5062"))
    assert zk_client.get_acls(f"/sipha/{other}")[0] == OPEN_ACL_UNSAFE
    assert zkauth.secure_tree(authed, s.root, acl) == 0  # a second walk changes nothing
    s.adopt_epoch()
    assert len(s.snapshot().contacts) == 299  # u1 deleted; the rest read through the credential


@pytest.mark.parametrize(("text", "said"), [
    (None, "cannot read: No such file or directory"),
    ("\n# nothing else\n", "no user:password line"),
    ("sipha\n", "line 1: expected user:password"),
    ("sipha:" + PASSWORD + "\n\nsecond-line-without-a-colon\n", "line 3: expected user:password"),
    ("si pha:" + PASSWORD, "line 1: the user must be 1-64 of A-Z a-z 0-9 _ . -"),
    ("sipha:short", "line 1: the password must be at least 16 characters"),
])
def test_a_bad_credential_file_is_said_in_one_line_naming_the_field(tmp_path: Path, text: str | None,
                                                                     said: str) -> None:
    f = tmp_path / "zk-auth"
    if text is not None:
        f.write_text(text)
    with pytest.raises(zkauth.ZkAuthError) as exc:
        zkauth.read(f)
    assert str(exc.value) == f"zookeeper.auth_file: {f}: {said}"


def test_a_credential_file_may_hold_several_and_comments(tmp_path: Path) -> None:
    f = tmp_path / "zk-auth"
    f.write_text(f"# the new one first\nsipha:{PASSWORD}\n\nold.user:the-old-password-here\n")
    got = zkauth.read(f)
    assert got.credentials == (("sipha", PASSWORD), ("old.user", "the-old-password-here"))
    assert got.client_kwargs()["auth_data"] == [("digest", f"sipha:{PASSWORD}"),
                                                ("digest", "old.user:the-old-password-here")]


def test_a_credential_is_changed_in_two_restarts_without_locking_the_cluster_out(
    zk_ensemble: Ensemble, cluster: str
) -> None:
    """What an operator does: new and old credential side by side on every node (the tree's ACL then grants both),
    then the new one alone (the old one loses access). Replacing it in one step is refused with the cause."""
    old, new = "the-old-credential-123", "the-new-credential-456"
    with started_client(zk_ensemble.hosts, 2.0, **_auth(old).client_kwargs()) as a:
        s = ZkStore(a, cluster, "node1")
        s.ensure_layout()
        s.bump_epoch()
        s.write([contact(1, "carol")])
    with started_client(zk_ensemble.hosts, 2.0, **_auth(new).client_kwargs()) as b, \
            pytest.raises(StoreUnavailable, match="not the credential the other nodes use"):
        ZkStore(b, cluster, "node2").ensure_layout()
    with started_client(zk_ensemble.hosts, 2.0, **_auth(new, old).client_kwargs()) as both:
        ZkStore(both, cluster, "node1").ensure_layout()  # the first node restarted with both lines
        assert all(zkauth.same_acl(both.get_acls(p)[0], _auth(new, old).acl) for p in _all_paths(both, s.root))
    with started_client(zk_ensemble.hosts, 2.0, **_auth(old).client_kwargs()) as a:
        a.get(s.contact_path("carol", "sip:carol@198.51.100.50:5062"))  # a node not restarted yet still works
    with started_client(zk_ensemble.hosts, 2.0, **_auth(new).client_kwargs()) as b:
        n = ZkStore(b, cluster, "node1")
        n.ensure_layout()  # then the old line dropped
        n.adopt_epoch()
        assert [r.aor for r in n.snapshot().contacts] == ["carol"]
    with started_client(zk_ensemble.hosts, 2.0, **_auth(old).client_kwargs()) as a, pytest.raises(NoAuthError):
        a.get(s.contact_path("carol", "sip:carol@198.51.100.50:5062"))


def test_the_model_wants_an_absolute_auth_file(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "examples" / "lab.yaml"
    text = src.read_text().replace("auth_file: /etc/sipha/zk-auth", "auth_file: zk-auth")
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(model.ModelError, match=r"zookeeper\.auth_file.*absolute path"):
        model.load(y)
    assert model.load(src).zookeeper.auth_file == "/etc/sipha/zk-auth"


def test_materialize_with_an_unreadable_credential_writes_an_empty_table_and_says_why(
    tmp_path: Path, zk_ensemble: Ensemble, capsys: pytest.CaptureFixture[str]
) -> None:
    """The proxy is waiting on it at its start: an empty table (the coordinator resyncs over RPC), not a crash."""
    src = Path(__file__).resolve().parents[2] / "examples" / "lab.yaml"
    y = tmp_path / "c.yaml"
    y.write_text(src.read_text().replace("/etc/sipha/zk-auth", str(tmp_path / "missing")))
    out = tmp_path / "pre.sqlite"
    rc = materialize.main(["--config", str(y), "--node", "node1", "--out", str(out), "--zk-hosts",
                           zk_ensemble.hosts, "--timeout", "2"])
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and doc["bindings"] == 0
    assert doc["empty"] == f"zookeeper not read: zookeeper.auth_file: {tmp_path / 'missing'}: cannot read: No such " \
                           "file or directory"
