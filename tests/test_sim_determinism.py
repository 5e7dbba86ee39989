"""A simulation is a function of its inputs: the same trace gives the same outcomes in every
process, whatever order the process's string hashing gives sets of model names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUN = """
import hashlib
from broker.catalog import load_catalog
from clients.bench.sim.bench import DATA, setting_systems
from clients.bench.sim.simulator import simulate
from clients.bench.sim.suite import SETTINGS, suite_traces
from clients.bench.sim.timing import MEASURED
setting = SETTINGS["paper"]
catalog = load_catalog()
trace = suite_traces(setting, loads=(0.85,), cvs=(1.0,), bursts=(), duration_s=30.0)[0]
lego = setting_systems(setting.simulate_setting, catalog, 8, ("lego",), setting.mixes["paper"], 1.0,
                       DATA / "baselines", 1, 80.0)[0]
outcomes, _ = simulate(lego, trace.arrivals, catalog, 8, 1, 1.0, seed=0, workflows=setting.workflows,
                       overheads=MEASURED)
print(len(outcomes), hashlib.sha1(repr([(o.index, o.status, round(o.latency_s or -1.0, 9))
                                        for o in outcomes]).encode()).hexdigest())
"""


def outcomes_digest(hash_seed: int) -> str:
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    done = subprocess.run([sys.executable, "-c", RUN], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_same_trace_simulates_the_same_in_processes_with_different_string_hashing():
    # seeds 1 and 3 dispatched the models of one instant in different orders before
    # broker/core/dispatch.py sorted them (measured: different latencies, and 594 against
    # 591 requests on time over the whole `paper cv 1 85%` trace)
    first = outcomes_digest(1)
    assert first.split()[0] == "102"
    assert outcomes_digest(3) == first
