"""One metadata transaction (`Tx`): containerd's snapshot rules over the ``snapshots`` table.

Rules (containerd 1.6 ``snapshots/storage``): keys and names share one space per namespace; a parent
must exist (NotFound) and be committed (InvalidArgument); a key or name is unique (AlreadyExists);
`Tx.commit` turns an active snapshot into a committed one under a new name, keeping its id (so its
directory), resetting its timestamps and replacing its labels (committing anything but an active
snapshot is a FailedPrecondition); `Tx.remove` refuses a snapshot that still has children
(FailedPrecondition); `Tx.update` changes labels only: an empty field mask replaces them all,
``labels`` likewise, ``labels.<key>`` sets (or, with an empty value, deletes) one; any other path is
InvalidArgument.

A transaction is scoped to one namespace, or (None) to all of them: containerd sends no namespace when
its garbage collector walks, removes and cleans up (its own keys embed the namespace), so such a scope
resolves a key in any namespace, and a key several namespaces hold is ambiguous (FailedPrecondition).

`CONTAINERD_NAMESPACE` is containerd's own flat space (`snapshotter.service.server`): what its metadata
layer creates. Every namespace's scope also sees it — a key not in the namespace is looked up there, and
a walk lists it — because containerd calls a proxy snapshotter both without a namespace (for clients
over its socket: ``ctr``, ``rpull``) and, from its in-process CRI plugin, with one (``k8s.io``): both must
find the same snapshots.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence

from ..errors import AlreadyExistsError, FailedPreconditionError, InvalidRequestError, NotFoundError
from .filters import Filter, snapshot_fields
from .records import Info, Kind, Layer, Snapshot, Usage, check_labels, now_ns, stored_labels

#: containerd's flat space (not a valid containerd identifier, so no header can name it).
CONTAINERD_NAMESPACE = "_"

_SELECT = "SELECT s.*, p.key AS parent_key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id "


class Tx:
    """One transaction, scoped to one namespace or (`namespace` None) to all of them.

    containerd sends no namespace when its garbage collector walks, removes and cleans up (its own
    keys embed the namespace, ``default/12/sha256:...``), so a scope of None resolves a key in any
    namespace; a key that several namespaces hold is then ambiguous (FailedPrecondition). Creating
    (`create`, `commit`) needs a namespace. Obtain a Tx from `MetaStore.read` or `MetaStore.write`.
    """

    def __init__(self, conn: sqlite3.Connection, namespace: str | None) -> None:
        self._conn = conn
        self.namespace = namespace

    @property
    def _where(self) -> str:
        return f"namespace {self.namespace!r}" if self.namespace is not None else "any namespace"

    def _required_namespace(self, what: str) -> str:
        if self.namespace is None:
            raise FailedPreconditionError(f"a namespace is required to {what}; send containerd-namespace")
        return self.namespace

    # -- reads -------------------------------------------------------------------------------------

    def _row(self, key: str) -> sqlite3.Row | None:
        if self.namespace is not None:
            row: sqlite3.Row | None = self._conn.execute(
                _SELECT + "WHERE s.namespace = ? AND s.key = ?", (self.namespace, key)
            ).fetchone()
            if row is None and self.namespace != CONTAINERD_NAMESPACE:
                row = self._conn.execute(
                    _SELECT + "WHERE s.namespace = ? AND s.key = ?", (CONTAINERD_NAMESPACE, key)
                ).fetchone()
            return row
        rows = self._conn.execute(_SELECT + "WHERE s.key = ?", (key,)).fetchall()
        if len(rows) > 1:
            spaces = ", ".join(sorted(repr(r["namespace"]) for r in rows))
            raise FailedPreconditionError(
                f"snapshot {key!r} exists in several namespaces ({spaces}); send containerd-namespace "
                "to say which",
                key=key,
            )
        return rows[0] if rows else None

    def _not_found(self, what: str, key: str) -> NotFoundError:
        return NotFoundError(
            f"{what} {key!r} does not exist in {self._where}; list the snapshots "
            "(ctr snapshots ls) for the right key",
            namespace=self.namespace,
            key=key,
        )

    @staticmethod
    def _info(row: sqlite3.Row) -> Info:
        return Info(
            name=row["key"],
            parent=row["parent_key"] or "",
            kind=Kind(row["kind"]),
            labels=json.loads(row["labels"]),
            created_ns=row["created_ns"],
            updated_ns=row["updated_ns"],
        )

    def _parents(self, parent_id: int | None) -> tuple[Layer, ...]:
        if parent_id is None:
            return ()
        rows = self._conn.execute(
            "WITH RECURSIVE chain(id, key, labels, parent_id, depth) AS ("
            " SELECT id, key, labels, parent_id, 0 FROM snapshots WHERE id = ?"
            " UNION ALL"
            " SELECT s.id, s.key, s.labels, s.parent_id, c.depth + 1"
            " FROM snapshots s JOIN chain c ON s.id = c.parent_id)"
            " SELECT id, key, labels FROM chain ORDER BY depth",
            (parent_id,),
        ).fetchall()
        return tuple(Layer(r["id"], r["key"], json.loads(r["labels"])) for r in rows)

    def _snapshot(self, row: sqlite3.Row) -> Snapshot:
        return Snapshot(
            id=row["id"],
            namespace=row["namespace"],
            info=self._info(row),
            usage=Usage(row["size"], row["inodes"]),
            parents=self._parents(row["parent_id"]),
        )

    def _check_free(self, key: str, namespace: str, what: str, remedy: str) -> None:
        if self._row(key) is not None:
            raise AlreadyExistsError(
                f"{what} {key!r} already exists in namespace {namespace!r}; remove it first or {remedy}",
                namespace=namespace,
                key=key,
            )

    def _existing(self, key: str, what: str = "snapshot") -> sqlite3.Row:
        row = self._row(key)
        if row is None:
            raise self._not_found(what, key)
        return row

    def stat(self, key: str) -> Info:
        return self._info(self._existing(key))

    def get(self, key: str) -> Snapshot:
        """Any snapshot with its id, usage and ancestors."""
        return self._snapshot(self._existing(key))

    def find(self, key: str) -> Snapshot | None:
        """Like `get`, but None when there is no such snapshot."""
        row = self._row(key)
        return self._snapshot(row) if row is not None else None

    def get_mountable(self, key: str) -> Snapshot:
        """An active or view snapshot (containerd: Mounts of a committed one is a FailedPrecondition)."""
        snap = self.get(key)
        if snap.info.kind is Kind.COMMITTED:
            raise FailedPreconditionError(
                f"snapshot {key!r} in {self._where} is committed, not active or view; "
                "prepare or view a child of it to mount its contents",
                namespace=snap.namespace,
                key=key,
            )
        return snap

    def walk(self, flt: Filter) -> list[Info]:
        """Every snapshot of the scope that the filter matches, in id order."""
        if self.namespace is not None:
            rows = self._conn.execute(
                _SELECT + "WHERE s.namespace IN (?, ?) ORDER BY s.id", (self.namespace, CONTAINERD_NAMESPACE)
            ).fetchall()
        else:
            rows = self._conn.execute(_SELECT + "ORDER BY s.id").fetchall()
        out = []
        for row in rows:
            info = self._info(row)
            if flt.match(snapshot_fields(info.name, info.parent, info.kind.label, info.labels)):
                out.append(info)
        return out

    def all_ids(self) -> set[int]:
        """The ids of every snapshot in every namespace (for Cleanup)."""
        return {r[0] for r in self._conn.execute("SELECT id FROM snapshots")}

    def mountable(self) -> list[Snapshot]:
        """Every active and view snapshot of the scope with its ancestors, in id order: the users of
        what their parents stand for (a remote-layer hook counts them, so its count survives restarts)."""
        sql = _SELECT + "WHERE s.kind != ?"
        args: tuple[object, ...] = (int(Kind.COMMITTED),)
        if self.namespace is not None:
            sql += " AND s.namespace = ?"
            args += (self.namespace,)
        return [self._snapshot(row) for row in self._conn.execute(sql + " ORDER BY s.id", args).fetchall()]

    # -- writes ------------------------------------------------------------------------------------

    def create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]) -> Snapshot:
        """Record a new snapshot. `Kind.COMMITTED` is for layers that arrive whole (remote layers)."""
        namespace = self._required_namespace(f"create snapshot {key!r}")
        if not key:
            raise InvalidRequestError(
                f"a snapshot key is required (namespace {namespace!r}); pass a non-empty key",
                namespace=namespace,
            )
        check_labels(labels, namespace=namespace, key=key)
        parent_id: int | None = None
        if parent:
            prow = self._existing(parent, "parent snapshot")
            if prow["kind"] != Kind.COMMITTED:
                raise InvalidRequestError(
                    f"parent {parent!r} of {key!r} in namespace {namespace!r} is "
                    f"{Kind(prow['kind']).label}, not committed; commit it first",
                    namespace=namespace,
                    key=key,
                )
            parent_id = prow["id"]
        self._check_free(key, namespace, "snapshot", "use another key")
        t = now_ns()
        cur = self._conn.execute(
            "INSERT INTO snapshots (namespace, key, kind, parent_id, labels, created_ns, updated_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (namespace, key, int(kind), parent_id, json.dumps(stored_labels(labels)), t, t),
        )
        return self._snapshot(self._conn.execute(_SELECT + "WHERE s.id = ?", (cur.lastrowid,)).fetchone())

    def commit(self, key: str, name: str, labels: Mapping[str, str], usage: Usage) -> Snapshot:
        """Turn the active snapshot `key` into the committed snapshot `name` (same id)."""
        namespace = self._required_namespace(f"commit {key!r}")
        if not name:
            raise InvalidRequestError(
                f"a name is required to commit {key!r} in namespace {namespace!r}",
                namespace=namespace,
                key=key,
            )
        check_labels(labels, namespace=namespace, key=name)
        self._check_free(name, namespace, "committed snapshot", "commit under another name")
        row = self._existing(key, "active snapshot")
        if row["kind"] != Kind.ACTIVE:
            raise FailedPreconditionError(
                f"snapshot {key!r} in namespace {namespace!r} is {Kind(row['kind']).label}, "
                "not active; only an active snapshot can be committed",
                namespace=namespace,
                key=key,
            )
        t = now_ns()
        self._conn.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?, "
            "size = ?, inodes = ? WHERE id = ?",
            (
                name,
                int(Kind.COMMITTED),
                json.dumps(stored_labels(labels)),
                t,
                t,
                usage.size,
                usage.inodes,
                row["id"],
            ),
        )
        return self.get(name)

    def remove(self, key: str) -> Snapshot:
        """Delete the record of `key`, which must have no children; returns what it was."""
        row = self._existing(key)
        child = self._conn.execute(
            "SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)
        ).fetchone()
        if child is not None:
            raise FailedPreconditionError(
                f"cannot remove snapshot {key!r} in {self._where}: it has children "
                f"(e.g. {child['key']!r}); remove them first",
                namespace=row["namespace"],
                key=key,
            )
        snap = self._snapshot(row)
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
        return snap

    def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str]) -> Info:
        """Update the labels of `name` as the field mask `paths` says (see the module docstring)."""
        row = self._existing(name)
        for path in paths:
            if path != "labels" and not path.startswith("labels."):
                raise InvalidRequestError(
                    f"cannot update field {path!r} of snapshot {name!r} in {self._where}: only "
                    "'labels' and 'labels.<key>' are mutable (name, parent, kind, created_at are not)",
                    namespace=row["namespace"],
                    key=name,
                )
        if not paths:
            updated = dict(labels)
        else:
            updated = json.loads(row["labels"])
            for path in paths:
                if path == "labels":
                    updated = dict(labels)
                else:
                    label = path[len("labels.") :]
                    updated[label] = labels.get(label, "")
        updated = stored_labels(updated)
        check_labels(updated, namespace=row["namespace"], key=name)
        self._conn.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (json.dumps(updated), now_ns(), row["id"]),
        )
        return self._info(self._conn.execute(_SELECT + "WHERE s.id = ?", (row["id"],)).fetchone())
