#!/usr/bin/env python3
"""Writes palisade.json, the Grafana dashboard (`python3 deploy/grafana/generate.py`).
Panels are listed here once; the JSON is generated so every panel has the same shape.
Import the JSON in Grafana (Dashboards → Import) and pick the Prometheus data source."""
import json, os

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RI = "$__rate_interval"

def panel(pid, title, exprs, x, y, w=12, h=8, unit="short", kind="timeseries", desc="", stack=False):
    p = {
        "id": pid, "type": kind, "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                    for i, (e, l) in enumerate(exprs)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
    }
    if stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
    if kind == "table":
        p["targets"][0]["format"] = "table"
        p["targets"][0]["instant"] = True
    return p

def row(pid, title, y):
    return {"id": pid, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}

q = lambda s: s.replace("RI", RI)
panels = [
    row(1, "Traffic and decisions", 0),
    panel(2, "Requests by decision", [(q('sum by (decision) (rate(palisade_requests_total[RI]))'), "{{decision}}")],
          0, 1, unit="reqps", stack=True, desc="Forwarded, blocked, refused (malformed), no_route, error."),
    panel(3, "Block rate", [(q('sum(rate(palisade_requests_total{decision="blocked"}[RI])) / sum(rate(palisade_requests_total[RI]))'), "blocked share")],
          12, 1, unit="percentunit"),
    panel(4, "Requests by route and method", [(q('sum by (route, method) (rate(palisade_request_methods_total[RI]))'), "{{route}} {{method}}")],
          0, 9, unit="reqps"),
    panel(5, "Responses to clients by class", [(q('sum by (class) (rate(palisade_responses_total[RI]))'), "{{class}}")],
          12, 9, unit="reqps", stack=True),
    row(6, "What blocks", 17),
    panel(7, "Blocks by rule set", [(q('sum by (rule_set) (rate(palisade_rule_matches_total{action="block"}[RI]))'), "{{rule_set}}")],
          0, 18, unit="reqps", stack=True),
    panel(8, "Top blocking rules (range)", [('topk(15, sum by (rule_set, rule) (increase(palisade_rule_matches_total{action="block"}[$__range])))', "")],
          12, 18, kind="table"),
    panel(9, "Blocks by stage and reason", [(q('sum by (stage, reason) (rate(palisade_blocked_total[RI]))'), "{{stage}} {{reason}}")],
          0, 26, unit="reqps"),
    panel(10, "Count-mode matches (dry run)", [(q('sum by (rule_set, rule) (rate(palisade_rule_matches_total{action="count"}[RI]))'), "{{rule_set}}/{{rule}}")],
          12, 26, unit="reqps", desc="Rules in count mode: what they would block."),
    panel(11, "Rate-limited requests", [(q('sum by (rule, action) (rate(palisade_ratelimit_limited_total[RI]))'), "{{rule}} {{action}}")],
          0, 34, unit="reqps"),
    panel(12, "Validation failures by operation", [(q('sum by (route, operation) (rate(palisade_validation_failures_total[RI]))'), "{{route}} {{operation}}")],
          12, 34, unit="reqps"),
    panel(13, "Geo blocks by country", [(q('sum by (country) (rate(palisade_geo_blocked_total[RI]))'), "{{country}}")],
          0, 42, unit="reqps"),
    panel(14, "Refused before routing", [(q('sum by (reason) (rate(palisade_requests_refused_total[RI]))'), "{{reason}}")],
          12, 42, unit="reqps", desc="Malformed or ambiguous requests (framing, host, path), limits of the HTTP layer."),
    row(15, "Latency", 50),
    panel(16, "Request duration p50 / p99 (Palisade and upstream)", [
        (q('histogram_quantile(0.5, sum by (le) (rate(palisade_request_duration_seconds_bucket[RI])))'), "p50"),
        (q('histogram_quantile(0.99, sum by (le) (rate(palisade_request_duration_seconds_bucket[RI])))'), "p99")],
          0, 51, unit="s"),
    panel(17, "Inspection time p50 / p99 by stage (Palisade's own)", [
        (q('histogram_quantile(0.5, sum by (le, stage) (rate(palisade_inspection_duration_seconds_bucket[RI])))'), "p50 {{stage}}"),
        (q('histogram_quantile(0.99, sum by (le, stage) (rate(palisade_inspection_duration_seconds_bucket[RI])))'), "p99 {{stage}}")],
          12, 51, unit="s"),
    panel(18, "Upstream response time p50 / p99", [
        (q('histogram_quantile(0.5, sum by (le, upstream) (rate(palisade_upstream_response_duration_seconds_bucket[RI])))'), "p50 {{upstream}}"),
        (q('histogram_quantile(0.99, sum by (le, upstream) (rate(palisade_upstream_response_duration_seconds_bucket[RI])))'), "p99 {{upstream}}")],
          0, 59, unit="s"),
    panel(19, "Upstream connect time p99", [
        (q('histogram_quantile(0.99, sum by (le, upstream) (rate(palisade_upstream_connect_duration_seconds_bucket[RI])))'), "{{upstream}}")],
          12, 59, unit="s"),
    row(20, "Upstreams", 67),
    panel(21, "Upstream responses by class", [(q('sum by (upstream, class) (rate(palisade_upstream_responses_total[RI]))'), "{{upstream}} {{class}}")],
          0, 68, unit="reqps"),
    panel(22, "Upstream errors, retries, ejections", [
        (q('sum by (upstream, kind) (rate(palisade_upstream_errors_total[RI]))'), "{{upstream}} {{kind}}"),
        (q('sum by (upstream) (rate(palisade_upstream_retries_total[RI]))'), "{{upstream}} retries"),
        (q('sum by (upstream) (increase(palisade_upstream_ejections_total[RI]))'), "{{upstream}} ejections")],
          12, 68),
    panel(23, "Usable upstream servers", [('palisade_upstream_servers{state="usable"}', "{{upstream}} usable"),
                                           ('palisade_upstream_servers{state="total"}', "{{upstream}} total")],
          0, 76),
    panel(24, "Active client connections", [('sum by (instance) (palisade_connections_active)', "{{instance}}")],
          12, 76),
    row(25, "Configuration, Redis, TLS", 84),
    panel(26, "Reloads and generation", [
        (q('sum by (result) (increase(palisade_config_reloads_total[RI]))'), "reloads {{result}}"),
        ('max by (instance) (palisade_config_generation)', "generation {{instance}}")],
          0, 85),
    panel(27, "Redis: errors, fallbacks, p99 latency", [
        (q('sum by (kind) (rate(palisade_redis_errors_total[RI]))'), "errors {{kind}}"),
        (q('sum by (rule, mode) (rate(palisade_ratelimit_fallback_total[RI]))'), "fallback {{rule}} {{mode}}"),
        (q('histogram_quantile(0.99, sum by (le) (rate(palisade_redis_duration_seconds_bucket[RI])))'), "p99 latency (s)")],
          12, 85),
    panel(28, "TLS handshakes and failures", [
        (q('sum by (version, alpn) (rate(palisade_tls_handshakes_total[RI]))'), "{{version}} {{alpn}}"),
        (q('sum by (reason) (rate(palisade_tls_handshake_failures_total[RI]))'), "failed: {{reason}}")],
          0, 93, unit="ops"),
    panel(29, "Days until certificate expiry", [('(palisade_tls_certificate_expiry_timestamp_seconds - time()) / 86400', "{{name}}")],
          12, 93, unit="d"),
    panel(30, "Body bytes inspected, decision log", [
        (q('sum by (route) (rate(palisade_inspected_body_bytes_total[RI]))'), "inspected {{route}}"),
        (q('rate(palisade_decision_log_lines_total[RI])'), "log lines/s"),
        (q('rate(palisade_decision_log_dropped_total[RI])'), "log lines dropped/s")],
          0, 101),
]

dashboard = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                  "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "title": "Palisade", "uid": "palisade", "schemaVersion": 39, "version": 1,
    "tags": ["palisade", "waf"], "timezone": "", "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": []}, "annotations": {"list": []},
    "panels": panels,
}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "palisade.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(f"wrote {out}: {len(panels)} panels")
