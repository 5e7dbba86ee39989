"""structlog set-up for a process's entry point (never called by library code).

Every process (broker, agent, actor, scheduler; `lego up` passes its flags on) takes
`--log-format json|console` and `--log-level`. Each line is one event: `event`,
`level`, `timestamp`, the process's own fields (`process`, and e.g. `agent_id` once
known) and the ids it concerns (`request_id`, `task_id`, `actor_id`), which callers
pass as keywords. Records of the standard `logging` module (libraries, warnings) and
uncaught exceptions are rendered the same way, so a JSON log is JSON on every line.
"""

from __future__ import annotations

import logging
import sys

import structlog

FORMATS = ("console", "json")
# Fields every line of this process carries; a processor adds them, since contextvars
# bound in the main thread are not seen by the threads a process starts later.
_process_fields: dict[str, object] = {}


def bind_process_fields(**fields: object) -> None:
    """Add fields to every later line of this process (e.g. the agent's id once known)."""
    _process_fields.update(fields)


def _add_process_fields(logger, method: str, event_dict: dict) -> dict:
    for key, value in _process_fields.items():
        event_dict.setdefault(key, value)
    return event_dict


def configure_logging(fmt: str = "console", level: str = "info", process: str = "") -> None:
    """Render to stderr as JSON lines or for a console; bind the process name."""
    if fmt not in FORMATS:
        raise ValueError(f"log format: expected console or json, got {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level: unknown level {level!r}")
    if process:
        bind_process_fields(process=process)
    shared = [
        structlog.contextvars.merge_contextvars,
        _add_process_fields,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks never show local variables: a frame's locals may hold an API key, a
    # prompt or an image (structlog shows them by default).
    if fmt == "json":  # a traceback becomes a structured field, not lines of its own
        renderer = structlog.processors.JSONRenderer()
        shared_tail = [structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
        shared_tail = []
    structlog.configure(
        processors=[*shared, *shared_tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_stdlib_logging(shared + shared_tail, renderer, numeric)
    sys.excepthook = _log_uncaught


def _route_stdlib_logging(processors: list, renderer, level: int) -> None:
    """The `logging` module's records (libraries, `warnings`) rendered like our own lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *processors],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)


def _log_uncaught(kind, value, traceback) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    structlog.get_logger("uncaught").critical("uncaught_exception", exc_info=(kind, value, traceback))


def message_ids(msg) -> dict:
    """The ids a protocol message concerns, for a log line about it."""
    ids = {key: getattr(msg, key) for key in ("request_id", "task_id", "actor_id", "call_id")
           if getattr(msg, key, None)}
    tasks = getattr(msg, "tasks", None)
    if isinstance(tasks, list) and tasks and hasattr(tasks[0], "task_id"):
        ids["task_ids"] = [t.task_id for t in tasks]
    return ids
