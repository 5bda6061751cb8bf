"""/metrics under TGI's names: every documented `tgi_*` metric with TGI's type and labels, counters
written the way TGI's exporter writes them (bare name, no `_total`, no `_created`), a text format that
prometheus_client's parser reads back, and a Grafana dashboard that queries only what is exposed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from router.metrics import Metrics
from router.scheduler.kv import KVManager

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "tgi_grafana.json"

# TGI's router metrics (tgi-reference.md §5): name → (type, label names).
TGI_METRICS = {
    "tgi_request_count": ("counter", set()),
    "tgi_request_success": ("counter", set()),
    "tgi_request_failure": ("counter", {"err"}),
    "tgi_request_duration": ("histogram", set()),
    "tgi_request_validation_duration": ("histogram", set()),
    "tgi_request_queue_duration": ("histogram", set()),
    "tgi_request_inference_duration": ("histogram", set()),
    "tgi_request_mean_time_per_token_duration": ("histogram", set()),
    "tgi_request_generated_tokens": ("histogram", set()),
    "tgi_request_input_length": ("histogram", set()),
    "tgi_request_max_new_tokens": ("histogram", set()),
    "tgi_request_skipped_tokens": ("histogram", set()),
    "tgi_queue_size": ("gauge", set()),
    "tgi_batch_current_size": ("gauge", set()),
    "tgi_batch_current_max_tokens": ("gauge", set()),
    "tgi_batch_max_total_tokens": ("gauge", set()),
    "tgi_batch_next_size": ("histogram", set()),
    "tgi_batch_inference_count": ("counter", {"method"}),
    "tgi_batch_inference_success": ("counter", {"method"}),
    "tgi_batch_inference_failure": ("counter", {"method"}),
    "tgi_batch_inference_duration": ("histogram", {"method"}),
    "tgi_batch_forward_duration": ("histogram", {"method"}),
    "tgi_batch_decode_duration": ("histogram", {"method"}),
    "tgi_batch_filter_duration": ("histogram", {"method"}),
    "tgi_batch_concat_duration": ("histogram", {"method"}),
    "tgi_batch_concat": ("counter", {"reason"}),
}
NOT_EXPORTED: set[str] = set()  # every TGI family is exported


def scrape() -> str:
    """/metrics of a router whose every labelled series has been recorded once."""
    metrics = Metrics(max_input_tokens=16, max_total_tokens=32)
    metrics.watch(KVManager(num_blocks=9, block_size=4, prefix_caching=True), lambda: 0)
    metrics.request_count.inc()
    metrics.failure("incomplete_generation")
    response = SimpleNamespace(forward_ns=1000, decode_ns=500, concat_ns=200, HasField=lambda field: True)
    for method in ("prefill", "decode"):
        metrics.step(method, response, started=1.0, filtering=1.5, finished=2.0, new_requests=1)
        metrics.step_failed(method)
    metrics.batch_concat.labels("chunking").inc()
    return metrics.render().decode()


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    found = {}
    for family in text_string_to_metric_families(text):
        labels = {key for sample in family.samples for key in sample.labels if key != "le"}
        found[family.name] = (family.type, labels)
    return found


def exposed_series(text: str) -> set[str]:
    """The names a PromQL query can select: those of the sample lines, as Prometheus stores them."""
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()
            for line in text.splitlines() if line and not line.startswith("#")}


def test_tgi_metrics_have_tgi_names_types_and_labels():
    found = families(scrape())
    expected = {name: spec for name, spec in TGI_METRICS.items() if name not in NOT_EXPORTED}
    assert {name: found.get(name) for name in expected} == expected
    assert NOT_EXPORTED.isdisjoint(found)
    extras = set(found) - set(TGI_METRICS)
    assert extras and all(name.startswith("pytgi_") for name in extras), extras


def test_counters_are_written_as_tgi_writes_them():
    text = scrape()
    sample_lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [line for line in sample_lines if re.match(r"\S+_(total|created)[{ ]", line)]
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    counters = {name for name, kind in types.items() if kind == "counter"}
    assert {"tgi_request_count", "tgi_request_failure", "pytgi_prefix_cache_hits"} <= counters
    for line in sample_lines:
        name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()
        family = name if name in types else re.sub(r"_(bucket|sum|count)$", "", name)
        # Each sample belongs to the family its TYPE line declared, under the same name for a counter.
        assert family in types, line
        assert types[family] != "counter" or name == family, line
    assert "tgi_request_count 1.0" in sample_lines
    assert 'tgi_request_failure{err="incomplete"} 1.0' in sample_lines
    assert 'tgi_batch_inference_count{method="decode"} 2.0' in sample_lines


def test_parser_reads_the_exposition_back():
    found = families(scrape())
    assert found["tgi_request_count"] == ("counter", set())
    assert found["tgi_batch_concat"] == ("counter", {"reason"})
    assert found["tgi_queue_size"] == ("gauge", set())
    assert found["tgi_request_duration"] == ("histogram", set())
    assert not [name for name in found if name.endswith(("_total", "_created"))]


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: strings, label matchers, ranges and grouping clauses
    removed, then every identifier that is not a function call or a keyword."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        if not expr[match.end():].lstrip().startswith("(") and match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # `label_values(metric, label)`: a Grafana function, not PromQL; check its metric.
            exprs.append(re.fullmatch(r"label_values\((\w+), *\w+\)", variable["query"]["query"]).group(1))
    return exprs


def test_promql_metric_names_parses_names_out_of_expressions():
    expr = ('histogram_quantile(0.9, sum by (le, method) (rate(tgi_batch_inference_duration_bucket'
            '{instance=~"$instance", method="decode"}[$__rate_interval])))'
            ' / on (method) tgi_queue_size offset 5m > bool 1e3')
    assert promql_metric_names(expr) == {"tgi_batch_inference_duration_bucket", "tgi_queue_size"}


def test_dashboard_queries_only_exposed_metrics():
    exposed = exposed_series(scrape())
    queries = dashboard_queries()
    assert len(queries) >= 20
    used = set()
    for expr in queries:
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= exposed, (expr, names - exposed)
        used |= names
    # The panels the dashboard promises: request rate, latency percentiles, queue, batch, tokens.
    assert {"tgi_request_count", "tgi_request_duration_bucket", "tgi_request_queue_duration_bucket",
            "tgi_request_mean_time_per_token_duration_bucket", "tgi_queue_size", "tgi_batch_current_size",
            "tgi_request_generated_tokens_sum"} <= used
