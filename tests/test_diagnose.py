"""The diagnosis of lost requests (clients/bench/sim/diagnose.py), on the smallest suite trace."""

from __future__ import annotations

from broker.catalog import load_catalog
from clients.bench.sim.bench import DATA, setting_systems
from clients.bench.sim.diagnose import diagnose, table, with_scheduler_args, without_admission
from clients.bench.sim.suite import SETTINGS


def lego_and_pooled():
    setting = SETTINGS["paper"]
    return setting_systems(setting.simulate_setting, load_catalog(), setting.gpus, ("lego", "pooled"),
                           setting.mixes["paper"], 1.0, DATA / "baselines", 1, setting.gpu_memory_gib)


def test_without_admission_turns_off_refusing_and_hopeless_dropping_for_every_system():
    for system in lego_and_pooled():
        plain = without_admission(system)
        assert (plain.admission, plain.drop_hopeless) == (False, False)
        args = list(plain.scheduler_args)
        if system.scheduler:  # the scheduler sets the broker's admission from its own flags
            assert args[args.index("--admission") + 1] == "false"
        assert plain.drop_late == system.drop_late  # late requests still end as late


def test_a_scheduler_flag_is_replaced_or_added_never_duplicated():
    lego = next(s for s in lego_and_pooled() if s.name == "lego")
    changed = with_scheduler_args(lego, admission_bound="sum", brand_new="1")
    assert changed.scheduler_args.count("--admission-bound") == 1
    assert changed.scheduler_args[changed.scheduler_args.index("--admission-bound") + 1] == "sum"
    assert changed.scheduler_args[-2:] == ("--brand-new", "1")


def test_a_burst_the_cluster_absorbs_loses_nothing_whichever_way_it_is_admitted():
    rows = diagnose("paper", ("burst 8",))
    assert [r["trace"] for r in rows] == ["burst 8"]
    row = rows[0]
    assert row["reference"] == 8
    assert row["systems"]["lego"]["as shipped"] == 8
    assert row["systems"]["lego"]["given the reference's set"] == 8
    # eight requests on eight GPUs: each ends when its lookahead said, give or take overheads
    assert 1.0 <= row["systems"]["lego"]["estimates ran long x"] < 1.5
    assert set(row["systems"]["lego"]) >= {"cfg split never", "bound sum", "no hopeless drop"}
    assert "| burst 8 | 8 | 8 |" in table(rows)


def test_an_unknown_trace_is_refused_naming_it():
    import pytest

    with pytest.raises(ValueError, match="paper cv 9"):
        diagnose("paper", ("paper cv 9 50%",))
