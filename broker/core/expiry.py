"""Every accepted request ends: what would otherwise wait for ever fails typed.

Runs in the broker process, sans-IO, on the core's tick (a few times a second). Two
cases, each ending the request with a `Failed` its client sees:

- `deadline_exceeded`: still unfinished `request_timeout_s` after it was accepted,
  whatever the reason (a hang nobody noticed, a queue that never drains);
- `no_capacity`: its ready work is queued for a model that no live actor serves, and
  none has for `orphan_timeout_s` (the model's actors died with their node agent and
  nothing replaced them). The grace period leaves time for the scheduler or an operator
  to start a replacement, which then takes the queued work as usual.

The tick costs O(1) when nothing is due: the directory keeps requests in the order they
were accepted, so the oldest is checked first and the scan stops at the first that is
not due; orphans are checked per model with queued work, not per request.
"""

from __future__ import annotations

import itertools

import structlog

from broker.core.actors import ActorTable
from broker.core.directory import RequestDirectory
from broker.core.metering import Meters
from broker.core.settings import BrokerSettings
from broker.core.state import READY
from broker.protocol import ErrorCode

log = structlog.get_logger(__name__)


class Expiry:
    def __init__(self, settings: BrokerSettings, actors: ActorTable, directory: RequestDirectory, meters: Meters):
        self.settings = settings  # replaced by the core when an operator changes a live setting
        self.actors, self.directory, self.meters = actors, directory, meters
        # model -> since when it has had no live actor while work was queued for it (until one joins)
        self.orphaned_since: dict[str, float] = {}

    def tick(self, now: float) -> None:
        self._expire(now)
        self._fail_orphans(now)

    def _expire(self, now: float) -> None:
        timeout = self.settings.request_timeout_s
        if timeout <= 0:
            return
        due = list(itertools.takewhile(lambda r: now - r.submitted_at >= timeout, self.directory.requests.values()))
        for request in due:
            self.meters.counters["requests_expired"] += 1
            self.directory.fail(request, ErrorCode.DEADLINE_EXCEEDED,
                                f"unfinished {now - request.submitted_at:.0f} s after it was accepted "
                                f"(request_timeout_s = {timeout:g})", now)

    def _serves(self, model: str) -> bool:
        return any(not actor.draining for actor in self.actors.by_model.get(model, ()))

    def _fail_orphans(self, now: float) -> None:
        grace = self.settings.orphan_timeout_s
        for model, queue in list(self.directory.queues.items()):
            if self._serves(model):
                self.orphaned_since.pop(model, None)
                continue
            if queue.depth <= 0:
                continue  # the clock keeps running: work queued later fails at once past the grace
            since = self.orphaned_since.setdefault(model, now)
            if grace <= 0 or now - since < grace:
                continue
            stranded = {node.request.request_id: node.request
                        for heap in queue.heaps.values() for *_, node in heap if node.state == READY}
            log.warning("model_unserved", model=model, since_s=round(now - since, 1), requests=len(stranded))
            for request in stranded.values():
                if request.finished:
                    continue
                self.meters.counters["requests_orphaned"] += 1
                self.directory.fail(request, ErrorCode.NO_CAPACITY,
                                    f"no live actor of model {model!r} for {now - since:.0f} s to run its queued work "
                                    f"(orphan_timeout_s = {grace:g})", now)
