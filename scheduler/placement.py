"""Where replicas go, and which go away: pure functions of a snapshot.

- A new actor goes to an accelerator with room for the model's profiled resident
  memory (plus `headroom_bytes` for activations), preferring the device with the
  least compute already placed on it (its heavy actors, then the sum of its actors'
  busy ratios: actors on one GPU take turns), never a second replica of the same base
  model on one device, since it would add memory but no compute (different base
  models may share a GPU: it then serves whichever has work); then a host that already runs the
  other models of the same workflows (their tensors then move by IPC, not the
  network), then the most free memory.
- When no device has room, an idle actor of a cold model (one above its target, or
  with nothing queued and more than its minimum) is converted: stopped, and the hot
  model started in its place, but only when that beats waiting: the hot model's
  backlog per replica must exceed the model's load time from its profile.
- Scale-down picks the replica that costs least to lose: idle, holding nothing, on
  the most crowded device.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.snapshot import ActorView, DeviceView, Snapshot


@dataclass(frozen=True)
class Spawn:
    model: str
    host: str
    device: str
    reason: str


@dataclass(frozen=True)
class Stop:
    actor_id: str
    model: str
    reason: str


def device_key(d: DeviceView | ActorView) -> tuple[str, str]:
    return d.host, d.device


def place(model: str, need_bytes: int, snapshot: Snapshot, neighbours: set[str], heavy: set[str],
          reserved: dict[tuple[str, str], int] | None = None, headroom_bytes: int = 0,
          reserved_heavy: dict[tuple, int] | None = None) -> DeviceView | None:
    """The device for one new actor of `model`, or None when none has room.

    `neighbours`: models that share a workflow with `model`; `heavy`: models whose
    compute dominates a device (base models): at most one heavy actor per device;
    `reserved` / `reserved_heavy`: bytes on a device, and heavy actors by (host, device,
    model), already promised to spawns not yet reported by its agent."""
    reserved = reserved or {}
    reserved_heavy = reserved_heavy or {}
    on_device: dict[tuple[str, str], list[ActorView]] = {}
    for actor in snapshot.actors:
        on_device.setdefault(device_key(actor), []).append(actor)
    hosts_with_neighbours = {a.host for a in snapshot.actors if a.model in neighbours}
    fits = [d for d in snapshot.accelerators
            if d.free_bytes - reserved.get(device_key(d), 0) >= need_bytes + headroom_bytes]
    if model in heavy:  # a second replica of a base model on one GPU adds memory, not compute
        fits = [d for d in fits if not any(a.model == model for a in on_device.get(device_key(d), []))
                and not reserved_heavy.get((*device_key(d), model))]
    if not fits:
        return None

    def score(d: DeviceView) -> tuple:
        actors = on_device.get(device_key(d), [])
        promised = sum(n for key, n in reserved_heavy.items() if key[:2] == device_key(d))
        heavy_here = sum(a.model in heavy for a in actors) + promised
        busy = sum(a.busy_ratio for a in actors)
        return (heavy_here, round(busy, 2), d.host not in hosts_with_neighbours, -(d.free_bytes - reserved.get(device_key(d), 0)))

    return min(fits, key=score)


def conversion_victim(hot_model: str, snapshot: Snapshot, targets: dict[str, int], minimums: dict[str, int],
                      hot_backlog_s: float, hot_load_s: float, need_bytes: int,
                      resident: dict[str, int], heavy: set[str] = frozenset(),
                      stopping: set[str] = frozenset()) -> ActorView | None:
    """An idle actor of a cold model whose device would fit `hot_model` once it stops
    (`resident`: each model's profiled resident bytes, given back when it stops).
    `stopping`: actors this round already stops (neither chosen again nor counted);
    a heavy hot model only goes where no other heavy actor stays."""
    replicas: dict[str, int] = {}
    for actor in snapshot.actors:
        if not actor.draining and actor.actor_id not in stopping:
            replicas[actor.model] = replicas.get(actor.model, 0) + 1
    hot_replicas = max(replicas.get(hot_model, 0), 1)
    if hot_backlog_s / hot_replicas <= hot_load_s:
        return None  # waiting for the existing replicas is quicker than loading a new one
    free = {device_key(d): d.free_bytes for d in snapshot.accelerators}
    # devices where a replica of the hot model stays: it cannot get a second one there
    staying_hot = {device_key(a) for a in snapshot.actors
                   if a.model == hot_model and a.actor_id not in stopping and not a.draining}
    candidates = []
    for actor in snapshot.actors:
        model = actor.model
        if model == hot_model or not actor.idle or actor.held or actor.actor_id in stopping:
            continue
        if hot_model in heavy and device_key(actor) in staying_hot:
            continue  # the hot model could not be placed beside its own replica that stays
        surplus = replicas.get(model, 0) - max(targets.get(model, 0), minimums.get(model, 1))
        cold = surplus > 0 or (snapshot.load(model).queue_depth == 0 and replicas.get(model, 0) > minimums.get(model, 1))
        if not cold or device_key(actor) not in free:
            continue
        candidates.append((-surplus, actor.busy_ratio, actor.actor_id, actor))
    for *_, actor in sorted(candidates, key=lambda c: c[:3]):
        if free[device_key(actor)] + resident.get(actor.model, 0) >= need_bytes:
            return actor
    return None


def scale_down_victim(model: str, snapshot: Snapshot) -> ActorView | None:
    crowd: dict[tuple[str, str], int] = {}
    for actor in snapshot.actors:
        crowd[device_key(actor)] = crowd.get(device_key(actor), 0) + 1
    mine = snapshot.actors_of(model)
    if not mine:
        return None
    return min(mine, key=lambda a: (a.in_flight, a.held, -crowd[device_key(a)], a.busy_ratio, a.actor_id))
