"""The exceptions of `snapshotter`.

Every failure this package reports is a `SnapshotterError`. Foreign exceptions (``OSError`` from a
command that is missing, ``subprocess.TimeoutExpired``, ``json`` errors in an image layout, and the
`blockformat`/`p2p` errors met while building or reading an image) are mapped at the boundary to the most
specific class here::

    SnapshotterError
     ├── MountError        a loop/mkfs/mount/umount command failed or hung; `command`, `returncode`,
     │                     `stderr` say which and how
     ├── ImageError        an image (OCI layout, manifest, config, layer blob or its annotations) that
     │    │                cannot be built or used; `where` names the file or reference
     │    └── LayoutError  a directory that cannot take (or is not) the OCI image layout a writer was
     │                     asked to fill (`damselfly fetch --dest`, `convert ... DIR`)
     ├── DeviceError       a device cannot be attached, detached or committed as asked
     ├── ControlError      the device daemon refused a request or could not be reached; `kind` names
     │                     the daemon-side exception class
     ├── LayerError        a layer tar that cannot be applied (hostile path, link out of the root,
     │                     truncated or corrupt stream, unknown entry); `layer`, `entry`, `why`
     ├── ConvertError      a conversion that cannot run as asked (not root, no /dev/fuse, a source or
     │                     destination that is neither a registry reference nor a layout)
     ├── ConfigError       the config file cannot be read, or holds an unknown key or a wrong type
     ├── ContainerdError   a call to containerd's API failed (`damselfly rpull`); `call` names it,
     │                     `code` is the gRPC status, `remedy` what to do
     └── SnapshotRequestError   a Snapshots request refused; one gRPC code per subclass (the table
          │                     `snapshotter.service.server.GRPC_CODES`); `namespace`, `key`
          ├── NotFoundError             the key, name or parent does not exist in the namespace
          ├── AlreadyExistsError        the key or name is taken in the namespace
          ├── FailedPreconditionError   the snapshot is in the wrong state (has children, not active),
          │                             or the call needs a namespace it was not given
          ├── InvalidRequestError       a bad argument: filter syntax, field mask, parent kind,
          │                             invalid namespace, empty key, oversized label
          └── UnavailableError          the metadata store cannot serve now (locked, closing)

A message says what failed, where, and the remedy. More classes (metadata store, gRPC mapping) hang
off `SnapshotterError` as the parts that raise them arrive; add each to this tree.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class SnapshotterError(Exception):
    """Base of every error raised by `snapshotter`."""


class MountError(SnapshotterError):
    """An external mount-related command (losetup, mkfs.ext4, mount, umount) failed.

    `what` is the action ("attach a loop device to /x/img"), `command` the exact argv that ran (empty
    when the request was refused before running anything), `returncode` its exit status (``None`` when
    it could not start or did not finish in time), `stderr` what it printed (or why it was refused),
    and `remedy` what the operator can do about it.
    """

    def __init__(
        self,
        what: str,
        command: Sequence[str],
        returncode: int | None,
        stderr: str,
        remedy: str = "check the device, the path and the kernel log (dmesg)",
    ) -> None:
        self.what = what
        self.command = tuple(command)
        self.returncode = returncode
        self.stderr = stderr.strip()
        self.remedy = remedy
        detail = self.stderr or "failed"
        if self.command:  # empty when we refused before running anything
            how = f"exited with status {returncode}" if returncode is not None else "did not complete"
            detail = f"`{shlex.join(self.command)}` {how}" + (f": {self.stderr}" if self.stderr else "")
        super().__init__(f"cannot {what}: {detail}; {remedy}")


class ImageError(SnapshotterError):
    """An image that cannot be built or used: a layout, manifest, config or layer that is wrong.

    `where` names the file, directory or reference; `why` says what is wrong with it.
    """

    def __init__(self, where: str, why: str, remedy: str = "rebuild or re-convert the image") -> None:
        self.where = where
        self.why = why
        self.remedy = remedy
        super().__init__(f"{where}: {why}; {remedy}")


class LayoutError(ImageError):
    """A destination that is not, and cannot become, an OCI image layout we may write into: a file, a
    non-empty directory without ``oci-layout``, another layout version, a damaged ``index.json``.

    `where` is the directory or file, `why` what is wrong with it, `remedy` what to do.
    """


class DeviceError(SnapshotterError):
    """A device cannot be attached, detached or committed as asked."""


class ControlError(SnapshotterError):
    """The device daemon refused a request or could not be reached."""

    def __init__(self, message: str, kind: str = "ControlError") -> None:
        super().__init__(message)
        self.kind = kind


class LayerError(SnapshotterError):
    """A layer tar (or its compressed stream) that cannot be applied onto a root filesystem.

    `layer` names the layer (a digest or a file), `entry` the tar entry being applied when it failed
    (``None`` when the failure is in the stream itself, before or between entries), `why` what is wrong
    with it and `remedy` what to do.
    """

    def __init__(
        self,
        layer: str,
        entry: str | None,
        why: str,
        remedy: str = "the layer is corrupt or hostile; rebuild it or check its source",
    ) -> None:
        self.layer = layer
        self.entry = entry
        self.why = why
        self.remedy = remedy
        where = f"layer {layer}" + (f", entry {entry!r}" if entry is not None else "")
        super().__init__(f"{where}: {why}; {remedy}")


class ConvertError(SnapshotterError):
    """A conversion that cannot run as asked: `why` it cannot, and the `remedy`."""

    def __init__(self, why: str, remedy: str) -> None:
        self.why = why
        self.remedy = remedy
        super().__init__(f"{why}; {remedy}")


class ConfigError(SnapshotterError):
    """The config file cannot be read, is not TOML, or holds an unknown key or a value of a wrong type."""

    def __init__(
        self, path: str, why: str, remedy: str = "fix the file; `damselfly config` shows every key"
    ) -> None:
        self.path = path
        self.why = why
        self.remedy = remedy
        super().__init__(f"config {path}: {why}; {remedy}")


class ContainerdError(SnapshotterError):
    """A call to containerd's gRPC API (as a client: `damselfly rpull`) failed.

    `call` names the call and its object ("Snapshots.Prepare extract-... (snapshotter damselfly)"),
    `code` is the gRPC status name containerd answered with ("NOT_FOUND", "UNAVAILABLE"...; its
    errdefs), `detail` containerd's message, `remedy` what the operator can do.
    """

    def __init__(self, call: str, code: str, detail: str, remedy: str) -> None:
        self.call = call
        self.code = code
        self.detail = detail
        self.remedy = remedy
        super().__init__(f"containerd {call}: {detail} ({code}); {remedy}")


class SnapshotRequestError(SnapshotterError):
    """A Snapshots request that was refused; the subclass decides the gRPC status code.

    `namespace` and `key` name the snapshot concerned when there is one.
    """

    def __init__(self, message: str, *, namespace: str | None = None, key: str | None = None) -> None:
        self.namespace = namespace
        self.key = key
        super().__init__(message)


class NotFoundError(SnapshotRequestError):
    """The key, name or parent does not exist in the namespace."""


class AlreadyExistsError(SnapshotRequestError):
    """The key or name is already taken in the namespace."""


class FailedPreconditionError(SnapshotRequestError):
    """The snapshot is not in a state that allows the request (it has children, it is not active)."""


class InvalidRequestError(SnapshotRequestError):
    """A malformed request: filter syntax, field mask, parent kind, namespace, key or label size."""


class UnavailableError(SnapshotRequestError):
    """The metadata store cannot serve the request now (busy beyond its timeout, or closing)."""
