"""Structured logs: with `--log-format json` every line every process writes is one JSON
object with its level, event and timestamp, and lines carry the ids they concern."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients import Client, RequestRejected
from clients.local import LocalCluster, LocalClusterSpec

WORKFLOW = "flux-schnell-txt2img"


def json_lines(text: str, where: str) -> list[dict]:
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{where}:{number} is not JSON: {line!r}")
        assert isinstance(record, dict), f"{where}:{number}: {line!r}"
        assert {"level", "event", "timestamp"} <= set(record), f"{where}:{number} lacks level/event/timestamp: {line!r}"
        lines.append(record)
    return lines


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_every_process_of_a_cluster_logs_json_lines_carrying_their_ids(tmp_path):
    run_dir = tmp_path / "run"
    spec = LocalClusterSpec(workflows=[WORKFLOW], options={"time_scale": 0.02}, run_dir=str(run_dir),
                            log_format="json", log_level="info", scheduler=True)
    with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
        for seed in range(2):
            client.generate(WORKFLOW, prompt="logged", seed=seed, steps=2, request_id=f"logged-{seed}", timeout=30)
        with pytest.raises(RequestRejected):
            client.submit(WORKFLOW, prompt="x", steps=-1, request_id="logged-bad")
        vae = next(a.actor_id for a in client.stats().actors if a.model == "Flux1VAE")
        client.drain_actor(vae)
        client.undrain_actor(vae)
        deadline = time.monotonic() + 30
        while client.stats().plan is None:  # the scheduler has run a round (and logged)
            assert time.monotonic() < deadline, "the scheduler posted no plan"
            time.sleep(0.1)
    logs = {path.name: json_lines(path.read_text(), path.name) for path in sorted((run_dir / "logs").glob("*.log"))}
    assert {"broker.log", "agent.log", "scheduler.log"} <= set(logs)
    actor_logs = [name for name in logs if name.startswith("actor-")]
    assert len(actor_logs) >= 4

    broker = logs["broker.log"]
    assert all(r["process"] == "broker" for r in broker)
    by_event: dict[str, list[dict]] = {}
    for record in broker:
        by_event.setdefault(record["event"], []).append(record)
    assert {r["request_id"] for r in by_event["request_completed"]} == {"logged-0", "logged-1"}
    (bad,) = by_event["request_rejected"]
    assert (bad["request_id"], bad["code"], bad["field"], bad["level"]) == ("logged-bad", "invalid_param",
                                                                           "params.steps", "info")
    assert [r["actor_id"] for r in by_event["actor_drained"] + by_event["actor_undrained"]] == [vae, vae]
    assert all("actor_id" in r for r in by_event["actor_joined"])

    assert all(r.get("agent_id") for r in logs["agent.log"])
    for name in actor_logs:  # spawned by the agent: each line names its actor
        assert all(r.get("actor_id") and r["process"].startswith("actor:") for r in logs[name]), name
    assert any(r["event"] == "scheduler_started" for r in logs["scheduler.log"])


def _python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])


def test_library_logging_warnings_and_a_crash_are_json_lines_too():
    script = (
        "import logging, warnings\n"
        "from broker.logs import configure_logging, bind_process_fields\n"
        "configure_logging('json', 'info', process='probe')\n"
        "bind_process_fields(actor_id='probe-1')\n"
        "import structlog\n"
        "structlog.get_logger('x').info('own_line', request_id='r1')\n"
        "structlog.get_logger('x').debug('below_the_level')\n"
        "logging.getLogger('some.library').warning('library says %s', 'hi')\n"
        "warnings.warn('careful now')\n"
        "raise RuntimeError('boom')\n"
    )
    proc = _python(script)
    assert proc.returncode == 1
    assert proc.stdout == ""
    records = json_lines(proc.stderr, "stderr")
    assert [r["event"] for r in records][0] == "own_line" and records[0]["request_id"] == "r1"
    assert "below_the_level" not in proc.stderr
    library = next(r for r in records if r["event"] == "library says hi")
    assert (library["level"], library["logger"], library["actor_id"]) == ("warning", "some.library", "probe-1")
    assert any("careful now" in r["event"] for r in records)
    (crash,) = [r for r in records if r["event"] == "uncaught_exception"]
    assert crash["level"] == "critical" and crash["process"] == "probe"
    assert crash["exception"][0]["exc_type"] == "RuntimeError" and crash["exception"][0]["exc_value"] == "boom"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_logged_traceback_never_shows_local_variables(fmt):
    """A frame's locals may hold an API key or a prompt: tracebacks carry none of them."""
    script = (
        "import structlog\n"
        "from broker.logs import configure_logging\n"
        f"configure_logging({fmt!r}, 'info')\n"
        "def handler(api_key):\n"
        "    secret_prompt = 'a-private-prompt'\n"
        "    raise ValueError('bad body')\n"
        "try:\n"
        "    handler('sk-the-callers-key')\n"
        "except ValueError:\n"
        "    structlog.get_logger('x').exception('handler_failed')\n"
    )
    proc = _python(script)
    assert proc.returncode == 0, proc.stderr
    assert "handler_failed" in proc.stderr and "bad body" in proc.stderr  # the traceback itself is there
    assert "sk-the-callers-key" not in proc.stderr and "a-private-prompt" not in proc.stderr


@pytest.mark.parametrize("argv", [["broker", "--log-format", "xml"], ["scheduler", "--log-format", "yaml"],
                                  ["agent", "--log-format", "text"], ["actor", "--model", "m", "--log-format", "x"]])
def test_every_entry_point_refuses_an_unknown_log_format(argv):
    proc = subprocess.run([str(Path(sys.executable).parent / "lego"), *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--log-format" in proc.stderr and "invalid choice" in proc.stderr
