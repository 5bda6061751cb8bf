"""benchmarks/compare_report.py: medians over runs, prefill and prefix rows, ratios to the baseline."""

from __future__ import annotations

import json

from benchmarks.compare_report import render, server_numbers


def _write(folder, name, tok_s, itl=10.0, ttft=100.0, per_request=None):
    summary = {"output_tok_s": tok_s, "itl_ms": {"p50": itl}, "ttft_ms": {"p50": ttft}, "per_request": per_request or []}
    (folder / f"{name}.json").write_text(json.dumps(summary))


def test_medians_prefill_prefix_and_ratios(tmp_path):
    for run, (base, ours) in enumerate([(100, 150), (120, 300), (80, 200)], start=1):
        for phase in ("c1", "c8", "c32"):
            _write(tmp_path, f"peer-{phase}-r{run}", base)
            _write(tmp_path, f"mine-{phase}-r{run}", ours, itl=5.0)
    # per_request rows: [ttft_ms, e2e_ms, prompt_tokens, output_tokens]
    _write(tmp_path, "peer-prefill", 0, per_request=[[1000.0, 1000.0, 500, 1], [2000.0, 2000.0, 500, 1]])
    _write(tmp_path, "mine-prefill", 0, per_request=[[500.0, 500.0, 500, 1]])
    _write(tmp_path, "peer-prefix", 0, per_request=[[3000.0, 0, 900, 1], [90.0, 0, 900, 1], [80.0, 0, 900, 1]])
    numbers = server_numbers(tmp_path, "peer")
    assert numbers["8 concurrent, aggregate tok/s"] == 100
    assert numbers["prefill tok/s, 512-token prompt"] == 375  # median of 500 and 250 tok/s
    assert numbers["1k shared prefix: first TTFT ms"] == 3000
    assert numbers["1k shared prefix: next TTFT ms (median)"] == 85
    table = render(tmp_path, "peer")
    assert table.splitlines()[0] == "| workload | peer | mine |"
    assert "| 8 concurrent, aggregate tok/s | 100.0 | 200.0 (2.00x) |" in table
    assert "| 1 stream, ITL p50 ms | 10.0 | 5.0 (2.00x) |" in table  # latency: baseline / value
    assert "| prefill tok/s, 512-token prompt | 375.0 | 1,000.0 (2.67x) |" in table
