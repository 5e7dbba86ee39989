"""What an actor keeps of each request's constants, so that they cross to it once.

Runs in the actor process, used by the fetcher on the compute thread only (no lock).
A request's constants (tensors named `REQUEST_CONSTANT_PREFIX...`, broker/protocol/
constants.py: the step conditioning, which every step's bundle carries unchanged)
are kept here once fetched from a peer; later fetches for that request ask the peer
to leave them out (`Fetch.omit`) and fill them in from here. When a step moves
between actors (balancing, CFG branches, ControlNets on their own actors), only its
latents and sampler state then move: a Flux request moved 99 MB with 20 steps
alternating between two actors, its 8.9 MB of T5 conditioning each time.

The cache is an optimisation only: an entry that is gone means the next fetch asks
for everything, so eviction is always safe. The actor is never told when a request
ends, so entries go in least-recently-used order past `max_bytes`, and when a
request has not been touched for `idle_s` (it finished, or its steps run elsewhere).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from actors.store import Bundle, value_nbytes
from broker.protocol.constants import REQUEST_CONSTANT_PREFIX

DEFAULT_MAX_BYTES = 512 * 1024**2  # about 57 Flux requests' conditioning
DEFAULT_IDLE_S = 120.0  # longer than any request's gap between two steps on one actor


def constant_names(bundle: Bundle) -> list[str]:
    return [name for name in bundle if name.startswith(REQUEST_CONSTANT_PREFIX)]


class RequestConstants:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, idle_s: float = DEFAULT_IDLE_S,
                 clock: Callable[[], float] = time.monotonic):
        if max_bytes < 0 or idle_s <= 0:
            raise ValueError("max_bytes must be >= 0 and idle_s > 0")
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self._clock = clock
        # request_id -> (last used, {name: tensor}), least recently used first
        self._requests: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._bytes = 0

    def held(self, request_id: str) -> dict[str, Any]:
        """The constants kept for `request_id` (empty when none); marks it used."""
        self._expire()
        entry = self._requests.get(request_id)
        if entry is None:
            return {}
        self._requests[request_id] = (self._clock(), entry[1])
        self._requests.move_to_end(request_id)
        return entry[1]

    def keep(self, request_id: str, bundle: Bundle) -> None:
        """Keep the request constants of a bundle fetched for `request_id`."""
        if not request_id:
            return
        names = constant_names(bundle)
        if not names:
            return
        _, kept = self._requests.pop(request_id, (0.0, {}))
        for name in names:
            if name not in kept:
                kept[name] = bundle[name]
                self._bytes += value_nbytes(bundle[name])
        self._requests[request_id] = (self._clock(), kept)
        self._evict()

    def stats(self) -> tuple[int, int]:
        """(requests, bytes) kept."""
        return len(self._requests), self._bytes

    def clear(self) -> None:
        self._requests.clear()
        self._bytes = 0

    def _drop(self, request_id: str) -> None:
        _, kept = self._requests.pop(request_id)
        self._bytes -= sum(value_nbytes(v) for v in kept.values())

    def _expire(self) -> None:
        horizon = self._clock() - self.idle_s
        while self._requests:
            request_id, (used, _) = next(iter(self._requests.items()))
            if used > horizon:
                break
            self._drop(request_id)

    def _evict(self) -> None:
        """Past `max_bytes`, drop least recently used requests first."""
        self._expire()
        while self._bytes > self.max_bytes and self._requests:
            self._drop(next(iter(self._requests)))
