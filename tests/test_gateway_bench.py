"""`python -m clients.bench.gateway` runs end to end and prints its table (a small run)."""

from __future__ import annotations

import re

import pytest

from clients.bench import gateway as bench_gateway


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_the_gateway_benchmark_prints_a_row_per_path_with_the_added_latency(capsys):
    assert bench_gateway.main(["--requests", "4", "--sizes", "64", "--concurrency", "1", "--no-openai"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 64 px")]
    assert [row.split("|")[3].strip() for row in rows] == ["python client", "gateway (http.client)"]
    client, gateway = ([cell.strip() for cell in row.split("|")] for row in rows)
    assert int(client[4]) == int(gateway[4]) == 4  # images measured per path
    assert float(client[5]) > 0 and re.fullmatch(r"[+-]\d+\.\d", gateway[7])  # the added median, signed
