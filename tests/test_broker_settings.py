"""Broker settings are declared once (`broker.core.settings`, `broker.server.BrokerConfig`):
the command-line flags, the config keys and the live-configurable set all derive from
that one declaration."""

from __future__ import annotations

import dataclasses

import pytest

from broker import protocol as p
from broker.config import flag_name, load_config
from broker.core.settings import LIVE, BrokerSettings, SettingError, live_changes
from broker.server import BrokerConfig, build_parser
from tests.broker_helpers import CLIENT, make_core, of

# Settings set only in a config file or LEGO_* variables (they never had a flag).
OFF_CLI = {"max_request_restarts", "max_requests_in_flight", "latency_window", "prefetch_below_s"}
LIVE_KEYS = {"admission", "admission_bound", "slo_multiple", "cfg_split", "serving", "drop_late", "drop_hopeless",
             "adapter_affinity", "adapter_bypass_s", "admission_overhead_s", "request_timeout_s", "orphan_timeout_s",
             "queue_order", "admission_probe_s"}
# `lego broker`'s flags before settings were declared once: none may change or vanish.
FLAGS = ["--frontend", "--backend", "--catalog", "--telemetry",
         "--key-file", "--authorized-keys",  # added with keys (issue 13)
         "--telemetry-interval-s",
         "--journal", "--journal-retention-s",  # added with the request journal (issue 13)
         "--heartbeat-interval-s",
         "--heartbeat-misses", "--max-task-attempts", "--affinity", "--cfg-split", "--admission", "--admission-bound",
         "--admission-overhead-s",
         "--admission-probe-s",  # a margin nothing teaches is probed (issue 14)
         "--slo-multiple", "--cost-scale", "--serving", "--drop-late", "--drop-hopeless",
         "--queue-order",  # added with the pooled baseline (issue 14)
         "--batch-by-profile", "--adapter-affinity", "--adapter-bypass-s",
         "--request-timeout-s", "--orphan-timeout-s",  # every request ends (issue 13)
         "--config", "--log-format", "--log-level"]


def _options():
    """dest -> the option strings of every flag `lego broker` takes."""
    by_dest: dict[str, list[str]] = {}
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            by_dest.setdefault(action.dest, []).extend(action.option_strings)
    return by_dest


def test_every_setting_has_exactly_one_flag_derived_from_its_name():
    options = _options()
    for f in dataclasses.fields(BrokerSettings):
        if f.name in OFF_CLI:
            assert f.name not in options and flag_name(f) is None, f.name
        else:
            assert options[f.name] == ["--" + f.name.replace("_", "-")], f.name
    assert {f.name for f in dataclasses.fields(BrokerSettings) if flag_name(f) is None} == OFF_CLI


def test_the_command_line_is_the_one_before():
    parser = build_parser()
    assert [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")] == FLAGS
    kinds = {a.dest: (a.type, tuple(a.choices) if a.choices else None) for a in parser._actions}
    assert kinds["affinity"] == (None, ("prefer", "avoid"))
    assert kinds["cfg_split"] == (None, ("never", "always", "auto"))
    assert kinds["admission_bound"] == (None, ("max", "sum", "lookahead"))
    assert kinds["serving"] == (None, ("micro", "monolith"))
    assert kinds["queue_order"] == (None, ("fcfs", "deadline"))
    for name in ("admission", "drop_late", "drop_hopeless", "batch_by_profile", "adapter_affinity"):
        assert kinds[name] == (None, ("on", "off")), name
    for name in ("heartbeat_interval_s", "telemetry_interval_s", "admission_overhead_s", "slo_multiple", "cost_scale",
                 "adapter_bypass_s"):
        assert kinds[name] == (float, None), name
    assert kinds["heartbeat_misses"] == kinds["max_task_attempts"] == (int, None)


def test_flags_build_the_config_and_its_core_settings():
    args = build_parser().parse_args(["--admission", "on", "--drop-late", "off", "--adapter-bypass-s", "1.5",
                                      "--catalog", "a.toml", "--catalog", "b.toml", "--frontend", "tcp://x:1"])
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    config = load_config(BrokerConfig, "broker", None, cli, environ={"LEGO_MAX_REQUEST_RESTARTS": "7"})
    assert (config.admission, config.drop_late, config.adapter_bypass_s) == (True, False, 1.5)
    assert (config.catalog, config.frontend_address, config.max_request_restarts) == (["a.toml", "b.toml"], "tcp://x:1", 7)
    settings = config.settings()
    assert type(settings) is BrokerSettings
    assert settings == dataclasses.replace(BrokerSettings(), admission=True, adapter_bypass_s=1.5, max_request_restarts=7)
    assert BrokerConfig.heartbeat_interval_s == BrokerSettings.heartbeat_interval_s  # the simulator reads defaults so


def test_the_config_validates_as_the_settings_do():
    with pytest.raises(ValueError, match="^affinity: expected 'prefer' or 'avoid'"):
        BrokerConfig(affinity="sideways")


def test_the_live_set_is_the_fields_marked_live():
    assert set(LIVE) == {f.name for f in dataclasses.fields(BrokerSettings) if f.metadata["live"]} == LIVE_KEYS


@pytest.mark.parametrize(("requested", "field", "message"), [
    ({"bogus": 1}, "settings.bogus", f"settings.bogus: not a live setting (live: {sorted(LIVE_KEYS)})"),
    ({"cost_scale": 2.0}, "settings.cost_scale", "settings.cost_scale: not a live setting"),
    ({"admission": 1}, "settings.admission", "settings.admission: wrong type int"),
    ({"slo_multiple": True}, "settings.slo_multiple", "settings.slo_multiple: wrong type bool"),
    ({"cfg_split": "sometimes"}, "settings.cfg_split", "settings.cfg_split: expected 'never', 'always' or 'auto'"),
    ({"queue_order": "random"}, "settings.queue_order", "settings.queue_order: expected 'fcfs' or 'deadline'"),
])
def test_an_unknown_or_ill_typed_live_key_is_refused_naming_it(requested, field, message):
    with pytest.raises(SettingError) as caught:
        live_changes(BrokerSettings(), requested)
    assert caught.value.field == field and str(caught.value).startswith(message)
    core = make_core()
    before = core.settings
    (reply,) = of(core.on_frontend(CLIENT, p.AdminConfigure(requested, call_id="c"), [], 0.0), p.AdminReply)
    assert (reply.ok, reply.field) == (False, field) and reply.message.startswith(message)
    assert core.settings == before


def test_a_live_change_takes_ints_for_seconds():
    assert live_changes(BrokerSettings(), {"adapter_bypass_s": 1, "admission": True}).adapter_bypass_s == 1
    assert live_changes(BrokerSettings(), {"queue_order": "deadline"}).queue_order == "deadline"


def test_a_plan_too_large_for_every_stats_answer_to_carry_is_refused_naming_it():
    # Found by tests/test_fuzz.py: every STATS answer carries the plan, so one near the
    # protocol's header limit would make them all unreadable, for every client.
    core = make_core()
    huge = {"note": "x" * (600 * 1024)}
    (reply,) = of(core.on_frontend(CLIENT, p.AdminConfigure({"admission": True}, plan=huge, call_id="c"), [], 0.0),
                  p.AdminReply)
    assert (reply.ok, reply.field) == (False, "plan")
    assert core.plan is None and core.settings.admission is False  # all or nothing
    (reply,) = of(core.on_frontend(CLIENT, p.AdminConfigure({}, plan={"note": "small"}, call_id="d"), [], 0.0),
                  p.AdminReply)
    assert reply.ok and core.plan == {"note": "small"}
    assert core.snapshot(0.0).plan == {"note": "small"}
