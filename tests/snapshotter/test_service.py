"""`damselfly serve` as containerd sees it: a real subprocess on a unix socket, spoken to over gRPC, its
mounts performed by the kernel. Status codes, mounts, Usage, Cleanup, List and namespaces."""

from __future__ import annotations

import errno
import itertools
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.containerd.types import mount_pb2

from .serving import (
    Served,
    commit,
    damselfly_argv,
    md,
    mounted,
    names,
    prepare,
    remove_all,
    start,
    unmount_under,
    view,
)

_counter = itertools.count()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve")
    s = start(tmp)
    try:
        yield s
    finally:
        code = s.stop()
        unmount_under(tmp)
        assert code == 0, s.log_text()


@pytest.fixture
def stub(served: Served) -> pb_grpc.SnapshotsStub:
    return served.stub


@pytest.fixture
def ns(stub: pb_grpc.SnapshotsStub) -> Iterator[str]:
    """A namespace of this test's own, emptied afterwards."""
    name = f"test-{next(_counter)}"
    yield name
    remove_all(stub, name)


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not hasattr(result, "mounts"):
            list(result)  # a server stream fails when read
    code: grpc.StatusCode = info.value.code()
    return code


def committed(stub: pb_grpc.SnapshotsStub, ns: str, name: str, parent: str = "") -> str:
    prepare(stub, ns, name + "-active", parent)
    commit(stub, ns, name + "-active", name)
    return name


# -- status codes ---------------------------------------------------------------------------------


def test_missing_key_or_parent_is_not_found(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    m = md(ns)
    assert code_of(stub.Stat, pb.StatSnapshotRequest(key="nope"), metadata=m) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Mounts, pb.MountsRequest(key="nope"), metadata=m) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Usage, pb.UsageRequest(key="nope"), metadata=m) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Remove, pb.RemoveSnapshotRequest(key="nope"), metadata=m) == grpc.StatusCode.NOT_FOUND
    req = pb.CommitSnapshotRequest(key="nope", name="n")
    assert code_of(stub.Commit, req, metadata=m) == grpc.StatusCode.NOT_FOUND
    req2 = pb.PrepareSnapshotRequest(key="k", parent="no-parent")
    assert code_of(stub.Prepare, req2, metadata=m) == grpc.StatusCode.NOT_FOUND
    req3 = pb.ViewSnapshotRequest(key="v", parent="no-parent")
    assert code_of(stub.View, req3, metadata=m) == grpc.StatusCode.NOT_FOUND
    upd = pb.UpdateSnapshotRequest(info=pb.Info(name="nope"))
    assert code_of(stub.Update, upd, metadata=m) == grpc.StatusCode.NOT_FOUND
    assert names(stub, ns) == []  # nothing was left behind by the failed Prepare/View


def test_duplicate_key_or_name_already_exists(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    m = md(ns)
    prepare(stub, ns, "dup")
    again = pb.PrepareSnapshotRequest(key="dup")
    assert code_of(stub.Prepare, again, metadata=m) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(stub.View, pb.ViewSnapshotRequest(key="dup"), metadata=m) == grpc.StatusCode.ALREADY_EXISTS
    base = committed(stub, ns, "base")
    clash = pb.CommitSnapshotRequest(key="dup", name=base)
    assert code_of(stub.Commit, clash, metadata=m) == grpc.StatusCode.ALREADY_EXISTS
    # keys and names share one space
    assert (
        code_of(stub.Prepare, pb.PrepareSnapshotRequest(key=base), metadata=m)
        == grpc.StatusCode.ALREADY_EXISTS
    )


def test_wrong_state_is_failed_precondition(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    m = md(ns)
    base = committed(stub, ns, "base")
    prepare(stub, ns, "child", base)
    assert (
        code_of(stub.Remove, pb.RemoveSnapshotRequest(key=base), metadata=m)
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    view(stub, ns, "v", base)
    commit_view = pb.CommitSnapshotRequest(key="v", name="from-view")
    assert code_of(stub.Commit, commit_view, metadata=m) == grpc.StatusCode.FAILED_PRECONDITION
    commit_committed = pb.CommitSnapshotRequest(key=base, name="again")
    assert code_of(stub.Commit, commit_committed, metadata=m) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.Mounts, pb.MountsRequest(key=base), metadata=m) == grpc.StatusCode.FAILED_PRECONDITION
    # once the children are gone the parent goes too
    stub.Remove(pb.RemoveSnapshotRequest(key="child"), metadata=m)
    stub.Remove(pb.RemoveSnapshotRequest(key="v"), metadata=m)
    stub.Remove(pb.RemoveSnapshotRequest(key=base), metadata=m)
    assert names(stub, ns) == []


def test_bad_filter_and_bad_field_mask_are_invalid_argument(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    m = md(ns)
    for bad in ("kind==", "name=x", 'labels."open', "name~=/[/", "a b"):
        listing = stub.List(pb.ListSnapshotsRequest(filters=["kind==active", bad]), metadata=m)
        with pytest.raises(grpc.RpcError) as info:
            list(listing)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "filter" in info.value.details()
    base = committed(stub, ns, "base")
    for path in ("parent", "name", "kind", "created_at"):
        upd = pb.UpdateSnapshotRequest(info=pb.Info(name=base, parent="x"))
        upd.update_mask.paths.append(path)
        assert code_of(stub.Update, upd, metadata=m) == grpc.StatusCode.INVALID_ARGUMENT, path
    # a parent that is not committed is an invalid argument too, as in containerd
    prepare(stub, ns, "act")
    on_active = pb.PrepareSnapshotRequest(key="x", parent="act")
    assert code_of(stub.Prepare, on_active, metadata=m) == grpc.StatusCode.INVALID_ARGUMENT


def test_namespace_header_missing_or_invalid(stub: pb_grpc.SnapshotsStub) -> None:
    req = pb.PrepareSnapshotRequest(key="k")
    assert code_of(stub.Prepare, req) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(stub.Prepare, req, metadata=md("bad namespace!")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.Prepare, req, metadata=md("-leading")) == grpc.StatusCode.INVALID_ARGUMENT


# -- mounts ---------------------------------------------------------------------------------------


def opts(m: mount_pb2.Mount) -> list[str]:
    return [o for o in m.options if o != "index=off"]


def test_mounts_follow_the_overlayfs_snapshotter(
    served: Served, stub: pb_grpc.SnapshotsStub, ns: str
) -> None:
    snaps = served.root / "snapshots"
    (m,) = prepare(stub, ns, "a")
    assert (m.type, list(m.options)) == ("bind", ["rw", "rbind"])
    a_fs = Path(m.source)
    assert a_fs.parent.parent == snaps and a_fs.name == "fs"
    assert a_fs.stat().st_mode & 0o777 == 0o755
    (v,) = view(stub, ns, "v0")
    assert (v.type, list(v.options)) == ("bind", ["ro", "rbind"])
    commit(stub, ns, "a", "A")
    (m2,) = stub.Mounts(pb.MountsRequest(key="v0"), metadata=md(ns)).mounts
    assert m2 == v

    (b,) = prepare(stub, ns, "b", "A")
    b_dir = snaps / Path(next(o for o in b.options if o.startswith("upperdir="))).parent.name
    assert b.type == "overlay"
    assert opts(b) == [f"workdir={b_dir}/work", f"upperdir={b_dir}/fs", f"lowerdir={a_fs}"]
    commit(stub, ns, "b", "B")
    (v1,) = view(stub, ns, "v1", "A")
    assert (v1.type, v1.source, list(v1.options)) == ("bind", str(a_fs), ["ro", "rbind"])
    (v2,) = view(stub, ns, "v2", "B")
    assert v2.type == "overlay"
    assert opts(v2) == [f"lowerdir={b_dir}/fs:{a_fs}"]  # nearest parent first, no upper
    (c,) = prepare(stub, ns, "c", "B")
    assert opts(c)[-1] == f"lowerdir={b_dir}/fs:{a_fs}"


def test_layers_stack_through_real_mounts(tmp_path: Path, stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    with mounted(prepare(stub, ns, "l1"), tmp_path / "l1") as d:
        (d / "etc").mkdir()
        (d / "etc" / "hosts").write_text("one\n")
        (d / "gone").write_text("x")
    commit(stub, ns, "l1", "L1")
    with mounted(prepare(stub, ns, "l2", "L1"), tmp_path / "l2") as d:
        assert (d / "etc" / "hosts").read_text() == "one\n"
        (d / "etc" / "hosts").write_text("two\n")
        (d / "gone").unlink()
        os.chown(d / "etc", 1, 1)
    commit(stub, ns, "l2", "L2")
    with mounted(view(stub, ns, "look", "L2"), tmp_path / "look") as d:
        assert (d / "etc" / "hosts").read_text() == "two\n"
        assert not (d / "gone").exists()
        assert (d / "etc").stat().st_uid == 1
        with pytest.raises(OSError) as info:
            (d / "new").write_text("no")
        assert info.value.errno == errno.EROFS
    with mounted(view(stub, ns, "first", "L1"), tmp_path / "first") as d:
        assert (d / "etc" / "hosts").read_text() == "one\n" and (d / "gone").exists()


# -- usage ----------------------------------------------------------------------------------------


def test_usage_measures_active_and_records_committed(
    tmp_path: Path, stub: pb_grpc.SnapshotsStub, ns: str
) -> None:
    def usage(key: str) -> pb.UsageResponse:
        resp: pb.UsageResponse = stub.Usage(pb.UsageRequest(key=key), metadata=md(ns))
        return resp

    prepare(stub, ns, "u")
    empty = usage("u")
    assert empty.inodes == 1  # the fs directory itself
    with mounted(stub.Mounts(pb.MountsRequest(key="u"), metadata=md(ns)).mounts, tmp_path / "u") as d:
        (d / "blob").write_bytes(os.urandom(1 << 20))
        (d / "hard").hardlink_to(d / "blob")  # counted once
    usage_of_new = usage("u")
    assert usage_of_new.inodes == 2
    assert (1 << 20) <= usage_of_new.size - empty.size < (1 << 20) + 64 * 1024
    commit(stub, ns, "u", "U")
    assert usage("U") == usage_of_new  # recorded at commit
    view(stub, ns, "uv", "U")
    assert usage("uv") == pb.UsageResponse(size=0, inodes=0)


# -- cleanup --------------------------------------------------------------------------------------


def test_cleanup_removes_only_directories_without_a_snapshot(
    served: Served, stub: pb_grpc.SnapshotsStub, ns: str
) -> None:
    snaps = served.root / "snapshots"
    (m,) = prepare(stub, ns, "keep")
    orphans = [snaps / "99999999", snaps / "new-leftover"]
    for o in orphans:
        (o / "fs").mkdir(parents=True)
        (o / "fs" / "file").write_text("x")
    stub.Cleanup(pb.CleanupRequest(), metadata=md(ns))
    assert not any(o.exists() for o in orphans)
    assert Path(m.source).is_dir()
    stub.Cleanup(pb.CleanupRequest())  # containerd's GC sends no namespace
    assert Path(m.source).is_dir()


def test_remove_deletes_the_directory(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    (m,) = prepare(stub, ns, "gone")
    snapshot_dir = Path(m.source).parent
    assert snapshot_dir.is_dir()
    stub.Remove(pb.RemoveSnapshotRequest(key="gone"), metadata=md(ns))
    assert not snapshot_dir.exists()
    (m2,) = prepare(stub, ns, "gone")  # the key is free again, with a new id
    assert Path(m2.source).parent != snapshot_dir


# -- list, stat, update ---------------------------------------------------------------------------


def test_list_filters_like_containerd(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    gc = {"containerd.io/gc.root": "check"}
    prepare(stub, ns, "a-np", labels=gc)
    prepare(stub, ns, "p-tmp", labels=gc)
    commit(stub, ns, "p-tmp", "p", gc)
    prepare(stub, ns, "a", "p", gc)
    stub.View(pb.ViewSnapshotRequest(key="v", parent="p", labels=gc), metadata=md(ns))
    prepare(stub, ns, "a-wl", "p", {**gc, "l": "2", "a.b": "dotted"})
    assert names(stub, ns) == ["a", "a-np", "a-wl", "p", "v"]
    assert names(stub, ns, "kind==active") == ["a", "a-np", "a-wl"]
    assert names(stub, ns, "kind==committed", "kind==view") == ["p", "v"]  # OR
    assert names(stub, ns, 'parent!="",kind==active') == ["a", "a-wl"]  # AND
    assert names(stub, ns, "labels.l") == ["a-wl"]
    assert names(stub, ns, "labels.l==2,name==a-wl") == ["a-wl"]
    assert names(stub, ns, 'labels."a.b"==dotted') == ["a-wl"]
    assert names(stub, ns, 'labels."containerd.io/gc.root"==check') == ["a", "a-np", "a-wl", "p", "v"]
    assert names(stub, ns, "name~=/^a-/") == ["a-np", "a-wl"]
    assert names(stub, ns, "parent==p") == ["a", "a-wl", "v"]


def test_list_streams_in_batches(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    for i in range(130):
        view(stub, ns, f"view-{i:03d}")
    batches = [len(r.info) for r in stub.List(pb.ListSnapshotsRequest(), metadata=md(ns))]
    assert batches == [100, 30]


def test_stat_update_and_timestamps(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    prepare(stub, ns, "s", labels={"keep": "1", "drop": "2"})
    info = stub.Stat(pb.StatSnapshotRequest(key="s"), metadata=md(ns)).info
    assert (info.name, info.parent, info.kind) == ("s", "", pb.ACTIVE)
    assert info.created_at == info.updated_at
    assert dict(info.labels) == {"keep": "1", "drop": "2"}

    upd = pb.UpdateSnapshotRequest(info=pb.Info(name="s", labels={"keep": "changed", "new": "3"}))
    upd.update_mask.paths.extend(["labels.keep", "labels.drop"])  # drop is absent: deleted
    got = stub.Update(upd, metadata=md(ns)).info
    assert dict(got.labels) == {"keep": "changed"}
    assert got.created_at == info.created_at
    assert got.updated_at.ToNanoseconds() > info.updated_at.ToNanoseconds()

    # no mask: all mutable fields (the labels) are replaced; the parent given is ignored
    got = stub.Update(
        pb.UpdateSnapshotRequest(info=pb.Info(name="s", parent="x", labels={"z": "9"})), metadata=md(ns)
    ).info
    assert (dict(got.labels), got.parent) == ({"z": "9"}, "")
    assert dict(stub.Stat(pb.StatSnapshotRequest(key="s"), metadata=md(ns)).info.labels) == {"z": "9"}


# -- namespaces -----------------------------------------------------------------------------------


def test_namespaces_are_isolated(stub: pb_grpc.SnapshotsStub) -> None:
    one, two = f"iso-{next(_counter)}", f"iso-{next(_counter)}"
    try:
        (m1,) = prepare(stub, one, "same-key")
        (m2,) = prepare(stub, two, "same-key")
        assert m1.source != m2.source
        commit(stub, one, "same-key", "only-in-one")
        assert names(stub, one) == ["only-in-one"]
        assert names(stub, two) == ["same-key"]
        stat = pb.StatSnapshotRequest(key="only-in-one")
        assert code_of(stub.Stat, stat, metadata=md(two)) == grpc.StatusCode.NOT_FOUND
        # a child cannot name a parent of another namespace
        child = pb.PrepareSnapshotRequest(key="c", parent="only-in-one")
        assert code_of(stub.Prepare, child, metadata=md(two)) == grpc.StatusCode.NOT_FOUND
        # without a namespace (containerd's GC) every namespace is seen ...
        every = names(stub, None)
        assert {"only-in-one", "same-key"} <= set(every)
        assert stub.Stat(stat).info.name == "only-in-one"
        # ... and a key that two namespaces hold is ambiguous
        prepare(stub, one, "twice")
        prepare(stub, two, "twice")
        rm = pb.RemoveSnapshotRequest(key="twice")
        assert code_of(stub.Remove, rm) == grpc.StatusCode.FAILED_PRECONDITION
        stub.Remove(pb.RemoveSnapshotRequest(key="only-in-one"))  # unique: removed without a namespace
        assert names(stub, one) == ["twice"]
    finally:
        remove_all(stub, one)
        remove_all(stub, two)


# -- the process ----------------------------------------------------------------------------------


def test_sigterm_stops_cleanly_and_state_survives_a_restart(tmp_path: Path) -> None:
    s = start(tmp_path)
    try:
        prepare(s.stub, "keep", "k", labels={"x": "1"})
        commit(s.stub, "keep", "k", "K")
    finally:
        code = s.stop(signal.SIGTERM)
    assert code == 0, s.log_text()
    assert not s.socket.exists()
    assert "serving containerd.services.snapshots.v1 on" in s.log_text()
    s2 = start(tmp_path)
    try:
        info = s2.stub.Stat(pb.StatSnapshotRequest(key="K"), metadata=md("keep")).info
        assert (info.kind, dict(info.labels)) == (pb.COMMITTED, {})
    finally:
        assert s2.stop(signal.SIGINT) == 0


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "snapshotter.sock"
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    s = start(tmp_path)
    try:
        argv = [*damselfly_argv(), "serve", "--root", str(tmp_path / "root2"), "--address", str(sock)]
        second = subprocess.run(
            [*argv, "--state-dir", str(tmp_path / "state2")],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "another process is serving" in second.stderr
    finally:
        assert s.stop() == 0


def test_config_command_prints_the_effective_config(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('log_level = "debug"\n[snapshotter]\nroot = "/srv/d"\n')
    argv = [*damselfly_argv(), "config", "--config", str(cfg)]
    out = subprocess.run(argv, check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'log_level = "debug"' in out.stdout
    assert 'root = "/srv/d"' in out.stdout
    assert 'address = "/run/damselfly/snapshotter.sock"' in out.stdout
    assert 'state_dir = "/var/lib/damselfly/device"' in out.stdout
    cfg.write_text("[snapshotter]\nrooot = 1\n")
    bad = subprocess.run(argv, check=False, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "unknown key 'snapshotter.rooot'" in bad.stderr
