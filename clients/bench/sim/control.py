"""The simulator's control side: the scheduler controller in virtual time, its admin
client answered by the broker core, and the helpers a simulation needs.

- `VirtualController` is `scheduler.controller.SchedulerController` (its settle,
  busy-ratio and apply logic, its config and PlanSettings) with one step taken at a
  virtual time; `AdminLink` answers its Client calls through the core's admin
  path (AdminSpawn/AdminStop/AdminConfigure -> ADMIN_REPLY).
- `scheduler_config` turns a SystemSpec's `scheduler_args` (the flags of `lego
  scheduler`) into its SchedulerConfig, with the same coercion as the process.
- `quiet_logs` silences the core's and the controller's per-request log lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from broker import protocol as p
from broker.catalog import Catalog
from broker.config import load_config
from scheduler.controller import SchedulerConfig, SchedulerController
from scheduler.link import LinkError

if TYPE_CHECKING:  # the simulator imports this module
    from clients.bench.sim.simulator import Simulation

ADMIN = b"sim-admin"  # the frontend identity of the admin calls (setup, scheduler)


def scheduler_config(args: Sequence[str]) -> SchedulerConfig:
    """A SystemSpec's `scheduler_args` (flags of `lego scheduler`) as its config."""
    defaults = SchedulerConfig()
    names = {f.name for f in dataclasses.fields(SchedulerConfig)}
    values: dict = {}
    items = iter(args)
    for flag in items:
        name, sep, value = str(flag).partition("=")
        if not name.startswith("--"):
            raise ValueError(f"scheduler_args: expected --FLAG VALUE, got {flag!r}")
        if not sep:
            value = next(items, None)
            if value is None:
                raise ValueError(f"scheduler_args: {flag} needs a value")
        field = {"actor_option": "actor_options"}.get(name[2:].replace("-", "_"), name[2:].replace("-", "_"))
        if field not in names:
            raise ValueError(f"scheduler_args: unknown flag {name}")
        if isinstance(getattr(defaults, field), list):
            values.setdefault(field, []).append(value)
        else:
            values[field] = value
    return load_config(SchedulerConfig, "scheduler", None, values, environ={})


class AdminLink:
    """What the scheduler controller calls on its `BrokerLink`, answered by the core in virtual time."""

    def __init__(self, sim: Simulation):
        self.sim = sim

    def _call(self, msg: p.Message, what: str) -> p.AdminReply:
        self.sim.replies.clear()
        self.sim.frontend(ADMIN, msg)
        reply = next((r for r in self.sim.replies if isinstance(r, p.AdminReply)), None)
        if reply is None or not reply.ok:
            raise LinkError(f"{what} refused: {reply.message if reply else 'no reply'}")
        return reply

    def spawn(self, model: str, device: str = "cpu", backend: str = "emulated", count: int = 1, host: str = "",
              max_batch_rows: int = 8, options: dict | None = None, timeout: float | None = None) -> p.AdminReply:
        return self._call(p.AdminSpawn(model, device, backend, host, count, max_batch_rows, options), "spawn")

    def stop_actor(self, actor_id: str, timeout: float | None = None) -> p.AdminReply:
        return self._call(p.AdminStop(actor_id), "stop")

    def configure(self, settings: dict | None = None, plan: dict | None = None, timeout: float | None = None) -> p.AdminReply:
        return self._call(p.AdminConfigure(settings or {}, plan), "configure")

    def stats(self) -> p.Stats:
        return self.sim.core.snapshot(self.sim.now)

    def close(self) -> None:
        return None


class VirtualController(SchedulerController):
    """The scheduler actor's controller with the simulator's clock instead of the wall's."""

    def __init__(self, config: SchedulerConfig, client: AdminLink, catalog: Catalog, costs):
        super().__init__(config, client)
        self.catalog, self.costs = catalog, costs  # the simulated cluster's, not config.catalog's

    def step_at(self, stats: p.Stats, now: float) -> list:
        """SchedulerController.step, at virtual time `now`."""
        return self.step(stats, now)

    def _stamp(self, now: float) -> str:
        return f"{now:.3f}s"  # virtual time, not the wall's


class _Silent:
    def __getattr__(self, name: str) -> Callable:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def quiet_logs():
    """No per-request log lines from the core and the controller while simulating."""
    names = ("broker.core.machine", "broker.core.intake", "broker.core.directory", "broker.core.results",
             "broker.core.recovery", "broker.core.peers", "broker.core.admin", "scheduler.controller")
    modules = [sys.modules[name] for name in names]
    saved = [(module, module.log) for module in modules if hasattr(module, "log")]
    for module, _ in saved:
        module.log = _Silent()
    try:
        yield
    finally:
        for module, log in saved:
            module.log = log
