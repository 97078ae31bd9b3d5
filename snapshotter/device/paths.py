"""Where a device daemon keeps its things in its state directory (`snapshotter.device.daemon` has the
layout). A module of its own so that a client (`damselfly rpull`, `mount`) finds the daemon without
importing the daemon itself: the FUSE server, the node and the peer network take most of a second to
import."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Paths:
    state: str

    @property
    def mountpoint(self) -> str:
        return os.path.join(self.state, "dev")

    @property
    def socket(self) -> str:
        return os.path.join(self.state, "devd.sock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.state, "devd.pid")

    @property
    def lock(self) -> str:
        """Held (flock) by the running daemon for its whole life: one daemon per state directory."""
        return os.path.join(self.state, "devd.lock")

    @property
    def start_lock(self) -> str:
        """Held by a client while it checks for a daemon and starts one: concurrent starters queue."""
        return os.path.join(self.state, "start.lock")
