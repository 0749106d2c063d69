"""The Grafana dashboards and provisioning under deploy/grafana.

The dashboards query the services' Prometheus series by name; ``CONTRACT`` below is the
list of those names and their labels that the services promise. Every query must name
only series of the contract (or Envoy's own ``envoy_*``), filter and group only by labels
those series carry, ``rate`` only counters and histogram buckets, and use only template
variables the dashboard defines. PromQL is checked superficially (balanced brackets and
quotes, the shapes above), not by a real parser: ``promtool`` is not installed here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.procs import REPO_ROOT

GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES_FILE = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS_FILE = GRAFANA / "provisioning" / "dashboards" / "genmesh.yaml"
DASHBOARDS_MOUNT = "/var/lib/grafana/dashboards"  # where docker-compose mounts dashboards/
PROMETHEUS_URL = "http://prometheus:9090"  # the docker-compose service
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True, slots=True)
class Metric:
    service: str  # the services/<service>/ that declares it
    kind: str  # counter, gauge or histogram
    labels: frozenset[str]


def _m(service: str, kind: str, *labels: str) -> Metric:
    return Metric(service, kind, frozenset(labels))


MV = ("model", "version")  # every worker series
CONTRACT: dict[str, Metric] = {
    # frontend
    "genmesh_requests_total": _m("frontend", "counter", "model", "tenant", "method",
                                 "finish_reason"),
    "genmesh_request_errors_total": _m("frontend", "counter", "model", "tenant", "code"),
    "genmesh_time_to_first_token_seconds": _m("frontend", "histogram", *MV),
    "genmesh_inter_token_latency_seconds": _m("frontend", "histogram", *MV),
    "genmesh_e2e_request_latency_seconds": _m("frontend", "histogram", *MV),
    "genmesh_prompt_tokens_total": _m("frontend", "counter", "model", "tenant"),
    "genmesh_generation_tokens_total": _m("frontend", "counter", "model", "tenant"),
    "genmesh_cached_prompt_tokens_total": _m("frontend", "counter", "model", "tenant"),
    "genmesh_response_cache_requests_total": _m("frontend", "counter", "result"),
    "genmesh_budget_tokens_used_total": _m("frontend", "counter", "tenant"),
    "genmesh_budget_rejections_total": _m("frontend", "counter", "tenant"),
    "genmesh_budget_tokens_per_minute": _m("frontend", "gauge", "tenant"),
    "genmesh_requests_in_flight": _m("frontend", "gauge", "method"),
    # worker
    "genmesh_num_requests_running": _m("worker", "gauge", *MV),
    "genmesh_num_requests_waiting": _m("worker", "gauge", *MV),
    "genmesh_kv_cache_usage_perc": _m("worker", "gauge", *MV),
    "genmesh_gpu_utilization_perc": _m("worker", "gauge", *MV, "gpu"),
    "genmesh_gpu_memory_used_bytes": _m("worker", "gauge", *MV, "gpu"),
    "genmesh_gpu_memory_total_bytes": _m("worker", "gauge", *MV, "gpu"),
    "genmesh_prefix_cache_queries_total": _m("worker", "counter", *MV),
    "genmesh_prefix_cache_hits_total": _m("worker", "counter", *MV),
    "genmesh_num_preemptions_total": _m("worker", "counter", *MV),
    "genmesh_device_seconds_total": _m("worker", "counter", *MV),
    "genmesh_cost_dollars_total": _m("worker", "counter", *MV),
    "genmesh_request_queue_time_seconds": _m("worker", "histogram", *MV),
    "genmesh_request_prefill_time_seconds": _m("worker", "histogram", *MV),
    "genmesh_request_decode_time_seconds": _m("worker", "histogram", *MV),
    "genmesh_request_cost_dollars": _m("worker", "histogram", *MV),
    # safety
    "genmesh_safety_decisions_total": _m("safety", "counter", "direction", "category", "action"),
    "genmesh_safety_check_seconds": _m("safety", "histogram", "direction"),
    # cache
    "genmesh_cache_lookups_total": _m("cache", "counter", "result"),
    "genmesh_cache_stores_total": _m("cache", "counter"),
    "genmesh_cache_evictions_total": _m("cache", "counter"),
    "genmesh_cache_store_errors_total": _m("cache", "counter"),
    "genmesh_cache_entries": _m("cache", "gauge"),
    "genmesh_cache_bytes": _m("cache", "gauge"),
    # rate-limit service
    "genmesh_ratelimit_decisions_total": _m("ratelimit", "counter", "tenant", "result"),
    # tokenizer
    "genmesh_tokenizer_requests_total": _m("tokenizer", "counter", "method"),
    "genmesh_tokenizer_latency_seconds": _m("tokenizer", "histogram", "method"),
}
# Labels Prometheus adds to every series it scrapes (deploy/prometheus/prometheus.yml).
TARGET_LABELS = frozenset({"job", "instance", "service"})
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
GRAFANA_VARIABLES = frozenset({"__rate_interval", "__interval", "__range", "__range_s"})
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+|\$__rate_interval|\$__interval|\$__range")

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SERIES = re.compile(r"\b(?:genmesh|envoy)_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(genmesh_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*(?:,|$)')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
RATED = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([a-z_:][a-z0-9_:]*)")
RANGE = re.compile(r"\[([^\]]*)\]")
# label_replace(v, "dst", "replacement", "src", "regex"): the tail names the new label.
LABEL_REPLACE_DST = re.compile(r',\s*"([a-zA-Z_]\w*)"\s*,\s*"[^"]*"\s*,\s*"\w+"\s*,\s*"[^"]*"\s*\)')
VARIABLE = re.compile(r"\$\{?([a-zA-Z_]\w*)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
LABEL_VALUES = re.compile(
    r"^label_values\(\s*([a-z_:][a-z0-9_:]*)\s*(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)$")


def contract_name(series: str) -> str | None:
    """The contract's name for a series a query names (a histogram's ``_bucket``, ``_count``
    and ``_sum`` belong to it), or None when the contract has no such series."""
    if series in CONTRACT:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in CONTRACT and CONTRACT[base].kind == "histogram":
            return base
    return None


def _without_strings(expr: str) -> str:
    """``expr`` with every string literal emptied (``"..."`` -> ``""``)."""
    return STRING.sub('""', expr)


def _unbalanced(expr: str) -> str | None:
    """Why ``expr``'s quotes or brackets do not pair up, or None when they do."""
    bare = _without_strings(expr)
    if '"' in bare.replace('""', ""):
        return "unbalanced quotes"
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in bare:
        if ch in "([{":
            stack.append(ch)
        elif ch in closing and (not stack or stack.pop() != closing[ch]):
            return f"unbalanced {ch!r}"
    return f"unclosed {''.join(stack)!r}" if stack else None


def check_expr(expr: str, variables: set[str]) -> list[str]:
    """What is wrong with one PromQL query (an empty list when nothing is); ``variables``
    are the dashboard's template variables."""
    if (unbalanced := _unbalanced(expr)) is not None:
        return [unbalanced]
    problems = []
    bare = _without_strings(expr)
    series = SERIES.findall(bare)
    known = {s: contract_name(s) for s in series if s.startswith("genmesh_")}
    problems += [f"{s} is not in the metrics contract" for s, name in known.items() if not name]
    labels = set(TARGET_LABELS) | {"le"} | set(LABEL_REPLACE_DST.findall(expr))
    for name in filter(None, known.values()):
        labels |= CONTRACT[name].labels
    for s, matchers in SELECTOR.findall(expr):
        consumed = "".join(m.group(0) for m in MATCHER.finditer(matchers))
        if consumed.strip() != matchers.strip():
            problems.append(f"cannot read the matchers {{{matchers}}} of {s}")
        if (selected := contract_name(s)) is not None:
            own = CONTRACT[selected].labels | TARGET_LABELS
            own |= {"le"} if s.endswith("_bucket") else set()
            problems += [f"{s} has no label {label!r}" for label in
                         (m.group(1) for m in MATCHER.finditer(matchers)) if label not in own]
    for group in GROUPING.findall(bare):
        for label in filter(None, (g.strip() for g in group.split(","))):
            if label not in labels and not label.startswith("envoy_"):
                problems.append(f"groups by {label!r}, which none of {series} carries")
    for s in RATED.findall(bare):
        rated = contract_name(s)
        if rated is not None and not (s.endswith("_total") or s != rated):
            problems.append(f"rate/increase over {s}, a {CONTRACT[rated].kind}")
    if "_bucket" in bare:
        grouped_by_le = any("le" in {g.strip() for g in group.split(",")}
                            for group in GROUPING.findall(bare))
        if "histogram_quantile(" not in bare or not grouped_by_le:
            problems.append("buckets outside histogram_quantile(q, sum by (le, ...) (...))")
    problems += [f"range [{r}] is not a duration" for r in RANGE.findall(bare)
                 if not DURATION.fullmatch(r)]
    problems += [f"undefined variable ${v}" for v in VARIABLE.findall(expr)
                 if v not in variables | GRAFANA_VARIABLES]
    return problems


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows and the panels of collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out += [panel, *panel.get("panels", [])]
    return out


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


@pytest.fixture(scope="module", params=DASHBOARD_FILES, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(json.loads(request.param.read_text()))


def test_the_overview_dashboard_is_there():
    assert GRAFANA / "dashboards" / "genmesh-overview.json" in DASHBOARD_FILES


def test_dashboard_shape(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"].startswith("genmesh-") and len(dashboard["uid"]) <= 40
    assert dashboard["title"] and "genmesh" in dashboard["tags"]
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    titles = [p["title"] for p in panels]
    assert len(set(ids)) == len(ids), f"duplicate panel ids: {sorted(ids)}"
    assert len(set(titles)) == len(titles), f"duplicate panel titles: {sorted(titles)}"


def test_panels_fit_the_grid_without_overlapping(dashboard):
    taken: dict[tuple[int, int], str] = {}
    for panel in _panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[x, y]!r}"
                taken[x, y] = panel["title"]


def test_panels_query_the_datasource_variable(dashboard):
    variables = _variables(dashboard)
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    provisioned = yaml.safe_load(DATASOURCES_FILE.read_text())["datasources"][0]
    assert source["current"]["value"] == provisioned["uid"]
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE_REF, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        assert all(t["datasource"] == DATASOURCE_REF for t in panel["targets"]), panel["title"]


def test_every_query_names_contract_series_and_labels(dashboard):
    variables = set(_variables(dashboard))
    problems = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            problems += [f"{panel['title']!r}: {p}" for p in check_expr(target["expr"], variables)]
    assert not problems, "\n".join(problems)


def test_legends_name_labels_the_query_keeps(dashboard):
    problems = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            groups = GROUPING.findall(_without_strings(expr))
            if not groups:
                continue  # a bare selector keeps every label
            kept = {g.strip() for group in groups for g in group.split(",")}
            kept |= set(LABEL_REPLACE_DST.findall(expr))
            problems += [f"{panel['title']!r}: legend {{{{{label}}}}} is not kept by {expr}"
                         for label in LEGEND_LABEL.findall(target.get("legendFormat", ""))
                         if label not in kept]
    assert not problems, "\n".join(problems)


def test_template_variables_read_contract_labels(dashboard):
    variables = _variables(dashboard)
    for name, variable in variables.items():
        if variable["type"] != "query":
            continue
        assert variable["datasource"] == DATASOURCE_REF, name
        match = LABEL_VALUES.match(_query(variable))
        assert match, f"${name}: {_query(variable)!r} is not label_values(series, label)"
        series, label = match.groups()
        assert series in CONTRACT and label in CONTRACT[series].labels, f"${name}"
        assert not check_expr(_query(variable), set(variables)), f"${name}"


def test_overview_filters_by_model_version_and_tenant():
    overview = json.loads((GRAFANA / "dashboards" / "genmesh-overview.json").read_text())
    assert {"datasource", "model", "version", "tenant"} <= set(_variables(overview))


def test_dashboards_together_show_every_contract_series():
    text = " ".join(path.read_text() for path in DASHBOARD_FILES)
    shown = {contract_name(s) for s in SERIES.findall(text)}
    assert set(CONTRACT) - shown == set()


def test_check_expr_catches_what_it_should():
    assert check_expr("sum by (model) (rate(genmesh_requests_total[5m]))", set()) == []
    assert check_expr("rate(genmesh_requests[5m])", set()) == [
        "genmesh_requests is not in the metrics contract"]
    assert check_expr('genmesh_cache_entries{tenant="a"}', set()) == [
        "genmesh_cache_entries has no label 'tenant'"]
    assert check_expr("rate(genmesh_cache_entries[1m])", set()) == [
        "rate/increase over genmesh_cache_entries, a gauge"]
    assert check_expr("sum by (version) (rate(genmesh_cache_bytes[$x]))", set()) == [
        "groups by 'version', which none of ['genmesh_cache_bytes'] carries",
        "rate/increase over genmesh_cache_bytes, a gauge",
        "range [$x] is not a duration", "undefined variable $x"]
    assert check_expr("sum(rate(genmesh_safety_check_seconds_bucket[5m]))", set()) == [
        "buckets outside histogram_quantile(q, sum by (le, ...) (...))"]
    assert check_expr("sum(rate(genmesh_requests_total[5m])", set()) == ["unclosed '('"]
    assert check_expr("sum(genmesh_cache_bytes])", set()) == ["unbalanced ']'"]
    assert check_expr('genmesh_cache_entries{service="cache}', set()) == ["unbalanced quotes"]


def _declared_names() -> set[str]:
    """``genmesh_*`` string literals of every services/**/metrics.py. prometheus_client adds
    ``_total`` to a counter's name, so a counter may be declared without it."""
    names = set()
    for path in (REPO_ROOT / "services").rglob("metrics.py"):
        names |= set(re.findall(r"""["'](genmesh_[a-z0-9_]+)["']""", path.read_text()))
    return names | {f"{name}_total" for name in names}


@pytest.mark.parametrize("service", sorted({m.service for m in CONTRACT.values()}))
def test_services_declare_the_contract_series(service):
    own = REPO_ROOT / "services" / service / "metrics.py"
    if not own.exists():
        pytest.skip(f"services/{service}/metrics.py is not written yet (its metrics are being "
                    "added concurrently); the contract names are checked once it exists")
    missing = sorted(name for name, m in CONTRACT.items()
                     if m.service == service and name not in _declared_names())
    assert not missing, f"no services/**/metrics.py declares {missing}"


def test_datasource_provisioning():
    config = yaml.safe_load(DATASOURCES_FILE.read_text())
    assert config["apiVersion"] == 1
    [source] = config["datasources"]
    assert source["type"] == "prometheus" and source["url"] == PROMETHEUS_URL
    assert source["uid"] and source["access"] == "proxy"


def test_dashboard_provisioning_reads_the_mounted_folder():
    config = yaml.safe_load(PROVIDERS_FILE.read_text())
    assert config["apiVersion"] == 1
    [provider] = config["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == DASHBOARDS_MOUNT


def test_dashboard_uids_are_unique():
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARD_FILES]
    assert len(set(uids)) == len(uids)
