"""A broker snapshot as lines of text, for `lego status` and `lego top`.

Pure functions (a Stats snapshot in, lines out), so they are tested without a
terminal or a cluster; `clients.cli.top` draws them on a screen.
"""

from __future__ import annotations

from broker import protocol as p

RECENT_SHOWN = 10


def table(headers: list[str], rows: list[list], indent: str = "  ") -> list[str]:
    """Columns as wide as their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_numeric(r[i]) for r in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return (indent + "  ".join(parts)).rstrip()

    return [line(headers), *(line(r) for r in cells)]


def _numeric(value) -> bool:
    """A number, a percentage or nothing ("-"): right-aligned."""
    return isinstance(value, (int, float)) or value in (None, "-") or (
        isinstance(value, str) and value.endswith("%") and value[:-1].replace(".", "", 1).isdigit())


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def actor_label(actor: p.ActorStats) -> str:
    """idle | busy | drained (an operator's drain: kept alive) | stopping."""
    if actor.state == "draining":
        return "stopping" if actor.stopping else "drained"
    return actor.state


def bounds_label(stats: p.Stats, model: str) -> str:
    """`min-max` replicas: an operator's bound where set (marked *), else the scheduler's."""
    effective = (stats.plan or {}).get("bounds", {}).get(model)
    operator = stats.replica_bounds.get(model, {})
    if effective is None and not operator:
        return "-"
    low, high = effective or (None, None)
    low = operator.get("min") if operator.get("min") is not None else low
    high = operator.get("max") if operator.get("max") is not None else high
    return f"{'-' if low is None else low}..{'-' if high is None else high}" + ("*" if operator else "")


def model_lines(stats: p.Stats, rates: dict[str, float] | None = None) -> list[str]:
    targets = (stats.plan or {}).get("targets", {})
    headers = ["model", "queue", "actors", "target", "replicas", "pending s", "ready s", "arrivals/s", "tasks"]
    if rates is not None:
        headers.append("tasks/s")
    rows = []
    for m in stats.models:
        row = [m.model, m.queue_depth, m.actors, targets.get(m.model, "-"), bounds_label(stats, m.model),
               float(m.pending_s), float(m.ready_s), float(m.arrival_rate), m.tasks_done]
        if rates is not None:
            row.append(rates.get(m.model, 0.0))
        rows.append(row)
    return table(headers, rows)


def actor_lines(stats: p.Stats) -> list[str]:
    rows = []
    for a in sorted(stats.actors, key=lambda a: (a.model, a.actor_id)):
        memory = a.telemetry.memory_used_bytes / 2**30 if a.telemetry else None
        rows.append([a.actor_id, a.model, actor_label(a), f"{a.host}/{a.device}", a.in_flight, a.credits, a.tasks,
                     a.max_batch_rows_seen, a.held_tensors, memory])
    return table(["actor", "model", "state", "device", "in flight", "credits", "tasks", "batch max", "held",
                  "mem GiB"], rows)


def workflow_lines(stats: p.Stats) -> list[str]:
    paused = set(stats.paused_workflows)
    rows = []
    for w in stats.workflows:
        if not (w.submitted or w.rejected or w.workflow in paused):
            continue
        attained = f"{100 * w.slo_met / w.completed:.1f}%" if w.completed else "-"
        rows.append([w.workflow, "paused" if w.workflow in paused else "open", w.submitted, w.completed, attained,
                     w.rejected, w.failed, w.latency_mode, w.slo_s, f"x{w.admission_factor:.2f}"])
    return table(["workflow", "admission", "submitted", "completed", "SLO met", "rejected", "failed",
                  "latency mode", "SLO s", "margin"], rows) if rows else []


def outcome_lines(stats: p.Stats, limit: int = RECENT_SHOWN) -> list[str]:
    """The newest refusals and failures first, with their age and reason."""
    recent = list(reversed(stats.recent_outcomes))[:limit]
    return [f"  {stats.time - o.time:6.1f}s ago  {o.kind:<8} {o.request_id:<34} {o.workflow:<24} {o.code}"
            f"{f' ({o.field})' if o.field else ''}: {o.message}" for o in recent]


def plan_lines(stats: p.Stats, limit: int = RECENT_SHOWN) -> list[str]:
    plan = stats.plan or {}
    lines = [f"  in progress: {line}" for line in plan.get("in_progress", [])]
    lines += [f"  {line}" for line in list(reversed(plan.get("decisions", [])))[:limit]]
    return lines


def status_lines(stats: p.Stats) -> list[str]:
    """Everything `lego status` prints, section by section."""
    lines = ["models:", *model_lines(stats), "actors:", *actor_lines(stats)]
    if workflows := workflow_lines(stats):
        lines += ["workflows:", *workflows]
    if stats.paused_workflows:
        lines.append("paused workflows: " + ", ".join(stats.paused_workflows))
    if outcomes := outcome_lines(stats):
        lines += ["recent rejections and failures (newest first):", *outcomes]
    if stats.plan:  # scripts/ wait for this line's start
        targets = ", ".join(f"{m}={n}" for m, n in sorted(stats.plan.get("targets", {}).items()))
        lines += [f"scheduler plan: targets {targets} (decisions newest first)", *plan_lines(stats)]
    lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.settings.items())))
    lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.counters.items())))
    return lines


def task_rates(stats: p.Stats, previous: p.Stats | None) -> dict[str, float]:
    """Tasks per second per model between two snapshots."""
    if previous is None or stats.time <= previous.time:
        return {}
    before = {m.model: m.tasks_done for m in previous.models}
    elapsed = stats.time - previous.time
    return {m.model: max(0, m.tasks_done - before.get(m.model, 0)) / elapsed for m in stats.models}


def top_lines(stats: p.Stats, previous: p.Stats | None, height: int, width: int, address: str = "") -> list[str]:
    """One screen of `lego top`: a summary line, then models, workflows, actors, recent
    outcomes and decisions; cut to `height` lines of at most `width` characters."""
    c = stats.counters
    busy = sum(a.state == "busy" for a in stats.actors)
    header = (f"lego top (q quits)  {address}  requests in flight {c.get('requests_in_flight', 0)}  submitted "
              f"{c.get('requests_submitted', 0)}  completed {c.get('requests_completed', 0)}  rejected "
              f"{c.get('requests_rejected', 0)}  failed {c.get('requests_failed', 0)}  actors {len(stats.actors)} "
              f"({busy} busy)  task p50 {stats.hop_latency_s.get('p50', 0.0) * 1000:.1f} ms")
    rates = task_rates(stats, previous) if previous is not None else None  # none yet at the first screen
    lines = [header, "", *model_lines(stats, rates)]
    if workflows := workflow_lines(stats):
        lines += ["", *workflows]
    lines += ["", *actor_lines(stats)]
    if outcomes := outcome_lines(stats, 5):
        lines += ["", "recent rejections and failures:", *outcomes]
    if decisions := plan_lines(stats, 5):
        lines += ["", "scheduler decisions:", *decisions]
    return [line[:width] for line in lines[:height]]
