"""The SQLite metadata store: containerd's snapshot rules, one transaction per call, namespaces."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidRequestError,
    NotFoundError,
    UnavailableError,
)
from snapshotter.labels import MAX_LABEL_SIZE
from snapshotter.service.filters import parse_all
from snapshotter.service.metadata import MetaStore
from snapshotter.service.records import Kind, Snapshot, Usage


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    s = MetaStore(tmp_path / "metadata.db")
    yield s
    s.close()


def create(
    store: MetaStore, kind: Kind, key: str, parent: str = "", ns: str = "ns", **labels: str
) -> Snapshot:
    with store.write(ns) as tx:
        return tx.create(kind, key, parent, labels)


def committed(store: MetaStore, name: str, parent: str = "", ns: str = "ns") -> Snapshot:
    create(store, Kind.ACTIVE, name + "-a", parent, ns)
    with store.write(ns) as tx:
        return tx.commit(name + "-a", name, {}, Usage())


def test_database_is_sqlite_in_wal_mode(store: MetaStore) -> None:
    create(store, Kind.ACTIVE, "k")
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT namespace, key, kind FROM snapshots").fetchall() == [("ns", "k", 2)]
    conn.close()


def test_create_records_kind_parent_labels_and_equal_timestamps(store: MetaStore) -> None:
    base = committed(store, "base")
    snap = create(store, Kind.ACTIVE, "k", "base", x="1", empty="")
    assert snap.info.kind is Kind.ACTIVE
    assert snap.info.parent == "base"
    assert dict(snap.info.labels) == {"x": "1"}  # an empty value is not stored, as in containerd
    assert snap.info.created_ns == snap.info.updated_ns
    assert snap.parent_ids == (base.id,)
    with store.read("ns") as tx:
        assert tx.stat("k") == snap.info


def test_parents_chain_nearest_first(store: MetaStore) -> None:
    a = committed(store, "a")
    b = committed(store, "b", "a")
    c = committed(store, "c", "b")
    v = create(store, Kind.VIEW, "v", "c")
    assert v.parent_ids == (c.id, b.id, a.id)
    assert [p.name for p in v.parents] == ["c", "b", "a"]


def test_missing_parent_is_not_found_and_an_uncommitted_one_invalid(store: MetaStore) -> None:
    with pytest.raises(NotFoundError, match="parent snapshot 'nope' does not exist in namespace 'ns'"):
        create(store, Kind.ACTIVE, "k", "nope")
    create(store, Kind.ACTIVE, "act")
    with pytest.raises(InvalidRequestError, match="is active, not committed"):
        create(store, Kind.VIEW, "v", "act")
    with store.read("ns") as tx:
        assert [i.name for i in tx.walk(parse_all([]))] == ["act"]


def test_duplicate_key_already_exists_across_kinds(store: MetaStore) -> None:
    committed(store, "c")
    create(store, Kind.ACTIVE, "a")
    for kind, key in ((Kind.ACTIVE, "a"), (Kind.VIEW, "a"), (Kind.ACTIVE, "c")):
        with pytest.raises(AlreadyExistsError):
            create(store, kind, key)
    create(store, Kind.ACTIVE, "a", ns="other")  # another namespace is another key space


def test_commit_keeps_the_id_resets_times_and_replaces_labels(store: MetaStore) -> None:
    act = create(store, Kind.ACTIVE, "a", old="1")
    with store.write("ns") as tx:
        done = tx.commit("a", "A", {"new": "2"}, Usage(size=4096, inodes=3))
    assert done.id == act.id
    assert done.info.kind is Kind.COMMITTED
    assert dict(done.info.labels) == {"new": "2"}
    assert done.info.created_ns == done.info.updated_ns >= act.info.created_ns
    assert done.usage == Usage(4096, 3)
    with store.read("ns") as tx, pytest.raises(NotFoundError):
        tx.stat("a")


def test_commit_errors_in_containerds_order(store: MetaStore) -> None:
    committed(store, "C")
    create(store, Kind.VIEW, "v")
    create(store, Kind.ACTIVE, "a")
    with store.write("ns") as tx, pytest.raises(AlreadyExistsError):
        tx.commit("missing", "C", {}, Usage())  # the name is checked first
    with store.write("ns") as tx, pytest.raises(NotFoundError):
        tx.commit("missing", "new", {}, Usage())
    with store.write("ns") as tx, pytest.raises(FailedPreconditionError, match="is view, not active"):
        tx.commit("v", "new", {}, Usage())
    with store.write("ns") as tx, pytest.raises(FailedPreconditionError, match="is committed, not active"):
        tx.commit("C", "new", {}, Usage())


def test_remove_refuses_a_snapshot_with_children(store: MetaStore) -> None:
    committed(store, "base")
    create(store, Kind.VIEW, "child", "base")
    with store.write("ns") as tx, pytest.raises(FailedPreconditionError, match="has children"):
        tx.remove("base")
    with store.write("ns") as tx:
        tx.remove("child")
        gone = tx.remove("base")
    assert gone.info.name == "base"
    with store.write("ns") as tx, pytest.raises(NotFoundError):
        tx.remove("base")


def test_ids_are_never_reused(store: MetaStore) -> None:
    first = create(store, Kind.ACTIVE, "k")
    with store.write("ns") as tx:
        tx.remove("k")
    again = create(store, Kind.ACTIVE, "k")
    assert again.id > first.id


def test_update_with_field_masks(store: MetaStore) -> None:
    snap = create(store, Kind.ACTIVE, "k", a="1", b="2", c="3")
    with store.write("ns") as tx:
        info = tx.update("k", {"a": "x", "z": "new"}, ["labels.a", "labels.b"])
    assert dict(info.labels) == {"a": "x", "c": "3"}  # b absent from the request: deleted
    assert info.created_ns == snap.info.created_ns and info.updated_ns > snap.info.updated_ns
    with store.write("ns") as tx:
        assert dict(tx.update("k", {"only": "1"}, ["labels"]).labels) == {"only": "1"}
        assert dict(tx.update("k", {"all": "2"}, []).labels) == {"all": "2"}  # empty mask: every label
    for path in ("parent", "name", "kind", "created_at", "labelsx"):
        with store.write("ns") as tx, pytest.raises(InvalidRequestError, match="only 'labels'"):
            tx.update("k", {}, [path])
    with store.read("ns") as tx:
        assert dict(tx.stat("k").labels) == {"all": "2"}  # the refused updates changed nothing


def test_labels_over_containerds_limit_are_refused(store: MetaStore) -> None:
    create(store, Kind.ACTIVE, "ok", k="v" * (MAX_LABEL_SIZE - 1))
    with pytest.raises(InvalidRequestError, match="exceed 4096 bytes"):
        create(store, Kind.ACTIVE, "big", k="v" * MAX_LABEL_SIZE)
    with pytest.raises(InvalidRequestError, match="key is required"):
        create(store, Kind.ACTIVE, "")


def test_an_error_inside_a_write_rolls_everything_back(store: MetaStore) -> None:
    with pytest.raises(RuntimeError), store.write("ns") as tx:
        tx.create(Kind.ACTIVE, "k", "", {})
        raise RuntimeError("the directory could not be built")
    with store.read("ns") as tx:
        assert tx.find("k") is None


def test_namespaces_and_the_any_namespace_scope(store: MetaStore) -> None:
    create(store, Kind.ACTIVE, "only-one", ns="one")
    create(store, Kind.ACTIVE, "both", ns="one")
    create(store, Kind.ACTIVE, "both", ns="two")
    with store.read("two") as tx:
        assert [i.name for i in tx.walk(parse_all([]))] == ["both"]
        with pytest.raises(NotFoundError, match="namespace 'two'"):
            tx.stat("only-one")
    with store.read(None) as tx:
        assert sorted(i.name for i in tx.walk(parse_all([]))) == ["both", "both", "only-one"]
        assert tx.get("only-one").namespace == "one"
        with pytest.raises(FailedPreconditionError, match="several namespaces"):
            tx.stat("both")
    with store.write(None) as tx:
        with pytest.raises(FailedPreconditionError, match="namespace is required"):
            tx.create(Kind.ACTIVE, "x", "", {})
        tx.remove("only-one")


def test_state_survives_reopening(tmp_path: Path) -> None:
    s = MetaStore(tmp_path / "m.db")
    created = create(s, Kind.ACTIVE, "k", x="1")
    s.close()
    with pytest.raises(UnavailableError, match="closed"), s.read("ns"):
        pass
    s2 = MetaStore(tmp_path / "m.db")
    with s2.read("ns") as tx:
        assert tx.get("k") == created
    s2.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(UnavailableError, match="schema version 99"):
        MetaStore(tmp_path / "m.db")


def test_a_held_write_lock_times_out_as_unavailable(tmp_path: Path) -> None:
    s = MetaStore(tmp_path / "m.db", busy_timeout=0.2)
    other = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(UnavailableError, match="locked"):
            create(s, Kind.ACTIVE, "k")
    finally:
        other.execute("ROLLBACK")
        other.close()
        s.close()


def test_concurrent_writers_from_threads_all_succeed(store: MetaStore) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                create(store, Kind.ACTIVE, f"t{i}-{j}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with store.read(None) as tx:
        assert len(tx.all_ids()) == 80
