"""The actor's session: the state its compute thread and heartbeat thread share.

Runs in the actor process; owns no socket. A session is one hello..disconnect span
with the broker. The compute thread (actors/runtime.py) starts sessions and records
the broker's WELCOME; the heartbeat thread (actors/heartbeat.py) reads them and sets
`lost` when the broker goes silent or disowns the session, which the compute thread
answers with a new session.

No lock: each field is written as one reference (atomic under the GIL) and every
reader copes with seeing the previous value for a moment, because a `lost` that names
an older epoch is ignored and a session not yet welcomed is not beaten for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Session:
    actor_id: str
    heartbeat_interval_s: float  # the configured one until the broker's WELCOME says otherwise
    heartbeat_misses: int
    epoch: int = 0  # compute thread: +1 per session
    welcomed_epoch: int = -1  # compute thread: the session the broker has welcomed
    # Heartbeat thread: (epoch, reason) when the broker went silent or forgot that session.
    lost: tuple[int, str] | None = None

    @property
    def id(self) -> str:
        """The work socket's identity for this session (and the heartbeat's `session`)."""
        return f"{self.actor_id}#{self.epoch}"[-250:]  # ZeroMQ caps identities at 255 bytes

    def welcomed(self) -> bool:
        return self.welcomed_epoch == self.epoch

    def lost_reason(self) -> str | None:
        """Why the current session was lost, or None while it stands."""
        lost = self.lost  # read once: the heartbeat thread may replace it meanwhile
        return lost[1] if lost is not None and lost[0] == self.epoch else None

    def begin(self) -> int:
        """A new session (compute thread); returns its epoch."""
        self.epoch += 1
        self.lost = None
        return self.epoch

    def welcome(self, heartbeat_interval_s: float, heartbeat_misses: int) -> None:
        """The broker's WELCOME of the current session (compute thread)."""
        self.heartbeat_interval_s, self.heartbeat_misses = heartbeat_interval_s, heartbeat_misses
        self.welcomed_epoch = self.epoch

    def mark_lost(self, epoch: int, reason: str) -> None:
        """Heartbeat thread: session `epoch` is gone; the compute thread starts another."""
        self.lost = (epoch, reason)
