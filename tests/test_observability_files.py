"""docker/observability/: the Prometheus config and alerts pass promtool and fire when they should, every
metric an alert or a dashboard panel reads is one Steward really serves (scraped from the API and from a
worker process, not listed by hand), the Grafana dashboard and provisioning hang together, and the compose
file's `observability` profile wires them to the API and the workers."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from tests.support.env import ROOT
from tests.support.net import free_port, get_once_up
from tests.support.workers import WorkerProcess

DOCKER = ROOT / "docker"
OBSERVABILITY = DOCKER / "observability"
PROMETHEUS_YML = OBSERVABILITY / "prometheus" / "prometheus.yml"
ALERTS_YML = OBSERVABILITY / "prometheus" / "alerts.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "dashboards" / "steward.json"
PROVISIONING = OBSERVABILITY / "grafana" / "provisioning"
COMPOSE = DOCKER / "compose.yaml"
PROFILE = "observability"
OBSERVABILITY_SERVICES = {"prometheus", "grafana", "jaeger"}
METRIC = re.compile(r"\bsteward_[a-z0-9_]+\b")
# Names in PromQL that are not Steward's: Prometheus's own per-target series.
PROMETHEUS_SERIES = {"up"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def promtool(*args: str | Path) -> str:
    checked = subprocess.run(["promtool", *map(str, args)], capture_output=True, timeout=120)
    output = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0, output
    return output


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def exposed_names(text: str) -> set[str]:
    """The series names an exposition serves or will serve once observed: a labelled counter or histogram
    nobody has touched yet has its HELP and TYPE lines and no samples."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update({"counter": [f"{family.name}_total"],
                      "histogram": [f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"],
                      "gauge": [family.name]}.get(family.type, [family.name]))
    return names


# --- Prometheus ---------------------------------------------------------------------------------------

def test_the_prometheus_config_and_the_alert_rules_pass_promtool() -> None:
    assert "SUCCESS" in promtool("check", "config", PROMETHEUS_YML)  # checks the rule files it names too
    assert "SUCCESS" in promtool("check", "rules", ALERTS_YML)
    config = load_yaml(PROMETHEUS_YML)
    assert [(OBSERVABILITY / "prometheus" / f).resolve() for f in config["rule_files"]] == [ALERTS_YML.resolve()]


def test_every_alert_waits_has_a_severity_and_says_what_and_why() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"StewardRunFailureRateHigh", "StewardQueueStalled", "StewardToolBreakerOpen",
                                           "StewardBudgetNearCap", "StewardReconcilerRecovering"}
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip(), rule["alert"]


def fired(alert: str, summary: str, **labels: str) -> dict[str, Any]:
    """An alert promtool should see firing: its labels, its summary as rendered, and its description with
    the labels filled in."""
    [rule] = [r for r in alert_rules() if r["alert"] == alert]
    description = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], rule["annotations"]["description"])
    return {"exp_labels": {**rule["labels"], **labels},
            "exp_annotations": {"summary": summary, "description": description}}


def test_the_alerts_fire_on_trouble_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    """promtool's rule unit tests: series in, alerts out (each alert both fires and stays quiet)."""
    tests = {
        "rule_files": [str(ALERTS_YML)],
        "evaluation_interval": "1m",
        "tests": [
            {   # 10% of runs fail (above the 5% objective) in one workflow, 2% in the other.
                "interval": "1m",
                "input_series": [
                    {"series": 'steward_runs_finished_total{workflow="bad",outcome="succeeded",tenant=""}',
                     "values": "0+9x60"},
                    {"series": 'steward_runs_finished_total{workflow="bad",outcome="failed",tenant=""}',
                     "values": "0+1x60"},
                    {"series": 'steward_runs_finished_total{workflow="bad",outcome="cancelled",tenant=""}',
                     "values": "0+50x60"},  # operators' cancels count neither way
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "StewardRunFailureRateHigh", "exp_alerts": []},  # `for` pending
                    {"eval_time": "50m", "alertname": "StewardRunFailureRateHigh", "exp_alerts": [fired(
                        "StewardRunFailureRateHigh",
                        "10% of Steward runs failed over 30 minutes (objective: at most 5%)")]},
                ],
            },
            {   # 2% failing, and a queue moving: nothing fires.
                "interval": "1m",
                "input_series": [
                    {"series": 'steward_runs_finished_total{workflow="ok",outcome="succeeded",tenant=""}',
                     "values": "0+49x60"},
                    {"series": 'steward_runs_finished_total{workflow="ok",outcome="failed",tenant=""}',
                     "values": "0+1x60"},
                    {"series": 'steward_queue_oldest_age_seconds{priority="normal",job="steward-api"}',
                     "values": "30x60"},
                    {"series": 'steward_breaker_state{tool="echo",tenant="t",job="steward-api"}',
                     "values": "0x20 2x3 0x36"},  # open from 21 to 24 minutes only
                    {"series": 'steward_budget_spend_usd{tenant="t",window="hour"}', "values": "5x60"},
                    {"series": 'steward_budget_cap_usd{tenant="t",window="hour"}', "values": "10x60"},
                ],
                "alert_rule_test": [
                    {"eval_time": "24m", "alertname": "StewardToolBreakerOpen", "exp_alerts": []},  # `for` 5m
                    *({"eval_time": "50m", "alertname": name, "exp_alerts": []}
                      for name in ("StewardRunFailureRateHigh", "StewardQueueStalled", "StewardBudgetNearCap",
                                   "StewardBudgetExhausted")),
                ],
            },
            {   # A stalled queue, an open breaker, spend near and at a cap, a reconciler repairing all along.
                "interval": "1m",
                "input_series": [
                    {"series": 'steward_queue_oldest_age_seconds{priority="high",instance="api-1"}',
                     "values": "0+60x30"},
                    {"series": 'steward_queue_oldest_age_seconds{priority="high",instance="api-2"}',
                     "values": "0+60x30"},  # two API replicas serve the same gauge: one alert
                    {"series": 'steward_breaker_state{tool="search",tenant="t",instance="api-1"}', "values": "2x30"},
                    {"series": 'steward_breaker_state{tool="search",tenant="t",instance="api-2"}', "values": "2x30"},
                    {"series": 'steward_budget_spend_usd{tenant="t",window="day"}', "values": "85x30"},
                    {"series": 'steward_budget_cap_usd{tenant="t",window="day"}', "values": "100x30"},
                    {"series": 'steward_budget_spend_usd{tenant="u",window="hour"}', "values": "10x30"},
                    {"series": 'steward_budget_cap_usd{tenant="u",window="hour"}', "values": "10x30"},
                    {"series": 'steward_budget_spend_usd{tenant="v",window="hour"}', "values": "10x30"},
                    {"series": 'steward_budget_cap_usd{tenant="v",window="hour"}', "values": "0x30"},  # no cap
                    {"series": 'steward_reconciler_recoveries_total{kind="lease_expired",instance="w1"}',
                     "values": "0+1x30"},
                    {"series": 'steward_reconciler_recoveries_total{kind="wait_timed_out",instance="w1"}',
                     "values": "0+1x30"},  # waits timing out are workflows' business, not trouble
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "StewardQueueStalled", "exp_alerts": [fired(
                        "StewardQueueStalled", "A high-priority step has waited 30m 0s for a worker",
                        priority="high")]},
                    {"eval_time": "30m", "alertname": "StewardToolBreakerOpen", "exp_alerts": [fired(
                        "StewardToolBreakerOpen", "The circuit breaker of tool search has been open for 5 minutes",
                        tool="search", tenant="t")]},
                    {"eval_time": "30m", "alertname": "StewardBudgetNearCap", "exp_alerts": [
                        fired("StewardBudgetNearCap", "Tenant t has spent 85% of its day cap", tenant="t",
                              window="day"),
                        fired("StewardBudgetNearCap", "Tenant u has spent 100% of its hour cap", tenant="u",
                              window="hour")]},
                    {"eval_time": "30m", "alertname": "StewardBudgetExhausted", "exp_alerts": [fired(
                        "StewardBudgetExhausted", "Tenant u has reached its hour budget cap", tenant="u",
                        window="hour")]},
                    {"eval_time": "30m", "alertname": "StewardReconcilerRecovering", "exp_alerts": [fired(
                        "StewardReconcilerRecovering", "The Steward reconciler keeps repairing lease_expired "
                        "(15 in 15 minutes)", kind="lease_expired")]},
                ],
            },
        ],
    }
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump(tests))
    assert "SUCCESS" in promtool("test", "rules", test_file)


# --- every metric read is a metric served ----------------------------------------------------------------

@pytest.fixture
def worker_metrics(worker_process: Callable[..., WorkerProcess]) -> Callable[[], Any]:
    async def scrape() -> str:
        port = free_port()
        worker_process(worker_metrics_port=port)
        answer = await get_once_up(f"http://127.0.0.1:{port}/metrics")
        assert answer.status_code == 200
        return answer.text
    return scrape


async def test_every_metric_the_alerts_and_the_dashboard_read_is_served(
    client: httpx.AsyncClient, settings: Settings, worker_metrics: Callable[[], Any]
) -> None:
    api = await client.get("/metrics")
    assert api.status_code == 200
    worker = await worker_metrics()
    served = exposed_names(api.text) | exposed_names(worker) | PROMETHEUS_SERIES
    # The scrape is the truth: a name the app never registered would fail below, and so would this.
    assert "steward_runs_active" in served and "steward_step_attempts_total" in served
    assert "steward_step_attempts_total" in exposed_names(worker)  # what a worker ran, from the worker

    expressions = {f"alert {r['alert']}": r["expr"] for r in alert_rules()}
    expressions.update({f"dashboard query {i}": q for i, q in enumerate(dashboard_queries(dashboard()))})
    assert len(expressions) > 30
    unknown: dict[str, set[str]] = {}
    for where, expr in expressions.items():
        used = set(METRIC.findall(expr)) | ({"up"} & set(re.findall(r"\b[a-z_]+(?=\{)", expr)))
        assert used, f"{where} reads no metric: {expr}"
        if used - served:
            unknown[where] = used - served
    assert not unknown, f"not served by the API nor a worker: {unknown}"


def test_a_metric_name_that_is_not_served_is_caught() -> None:
    """The check above compares real names: a typo or a counter read without its _total is not one."""
    text = ("# HELP steward_x_total X\n# TYPE steward_x_total counter\n"
            "# HELP steward_h H\n# TYPE steward_h histogram\n")
    assert exposed_names(text) == {"steward_x_total", "steward_h_bucket", "steward_h_sum", "steward_h_count"}
    assert "steward_x" not in exposed_names(text)


# --- Grafana -----------------------------------------------------------------------------------------

def test_the_dashboard_has_titled_panels_with_queries_on_the_datasource_variable() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 42 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows[:6] == ["Runs", "Steps", "Agents and models", "Tools", "Costs and budgets", "Queues and recovery"]
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        assert panel["id"] not in ids, panel
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                   for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] == "row":
            continue
        assert panel["title"].strip(), panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_grafana_provisioning_points_at_the_profile_s_prometheus_and_the_dashboards() -> None:
    compose = load_yaml(COMPOSE)["services"]
    datasources = {d["type"]: d for d in load_yaml(PROVISIONING / "datasources" / "steward.yml")["datasources"]}
    prometheus_port = compose["prometheus"]["ports"][0].split(":")[-1]
    assert datasources["prometheus"]["url"] == f"http://prometheus:{prometheus_port}"
    assert datasources["prometheus"]["isDefault"] is True
    assert datasources["jaeger"]["url"] == "http://jaeger:16686"
    [provider] = load_yaml(PROVISIONING / "dashboards" / "steward.yml")["providers"]
    mounts = dict(reversed(v.split(":")[:2]) for v in compose["grafana"]["volumes"])  # target -> source
    assert (DOCKER / mounts[provider["options"]["path"]]).resolve() == DASHBOARD.parent.resolve()
    assert (DOCKER / mounts["/etc/grafana/provisioning"]).resolve() == PROVISIONING.resolve()


# --- compose -------------------------------------------------------------------------------------------

def test_the_compose_profile_runs_prometheus_grafana_and_jaeger_wired_to_steward() -> None:
    services = load_yaml(COMPOSE)["services"]
    profiled = {name for name, s in services.items() if s.get("profiles")}
    assert profiled == OBSERVABILITY_SERVICES
    for name in OBSERVABILITY_SERVICES:
        assert services[name]["profiles"] == [PROFILE] and services[name]["image"].rpartition(":")[2] != "latest"

    # Prometheus reads the files of docker/observability/prometheus and scrapes the API and the workers there.
    mounts = dict(reversed(v.split(":")[:2]) for v in services["prometheus"]["volumes"])
    assert (DOCKER / mounts["/etc/prometheus"]).resolve() == PROMETHEUS_YML.parent.resolve()
    jobs = {j["job_name"]: j["dns_sd_configs"][0] for j in load_yaml(PROMETHEUS_YML)["scrape_configs"]
            if "dns_sd_configs" in j}
    assert jobs["steward-api"]["names"] == ["api"]
    assert str(jobs["steward-api"]["port"]) in services["api"]["command"]
    assert jobs["steward-worker"]["names"] == ["worker"]
    worker_env = services["worker"]["environment"]
    assert str(jobs["steward-worker"]["port"]) == worker_env["STEWARD_WORKER_METRICS_PORT"]
    assert worker_env["STEWARD_HOST"] == "0.0.0.0"  # reachable from Prometheus's container

    # Traces of the API and the workers go to Jaeger's OTLP/HTTP port unless the caller says otherwise.
    assert "4318:4318" in services["jaeger"]["ports"]
    for name in ("api", "worker", "migrate"):
        endpoint = services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert re.fullmatch(r"\$\{OTEL_EXPORTER_OTLP_ENDPOINT-\}", endpoint), name  # off unless asked
        assert services[name]["environment"]["STEWARD_METRICS_TENANT_LABEL"] == "true"  # budget caps exposed
        # The rest of the Steward environment stays the same for every container (one secret key).
        assert services[name]["environment"]["STEWARD_SECRET_KEYS"] == worker_env["STEWARD_SECRET_KEYS"]
