"""The operator's monitoring kit (``monitoring/``): Prometheus rules, their unit tests,
the Grafana dashboard, and the metrics they use as a live cluster serves them.

``promtool`` (Debian's ``prometheus`` package) checks and unit-tests the rules;
without it those tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.up_cli import UpCli
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "prometheus" / "haif-rules.yml"
RULE_TESTS = MONITORING / "prometheus" / "haif-rules.test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "haif-overview.json"
PROVISIONING = MONITORING / "grafana" / "provisioning"

_METRIC = re.compile(r"\bhaif_[a-z0-9_]+\b")
_RECORDED = re.compile(r"\bhaif:[a-z0-9_:]+\b")
#: Series Prometheus makes itself, not a service.
_SYNTHETIC = frozenset({"up"})


def promtool() -> str:
    """The promtool binary; skip without it (fail under CI=true, where it must be installed)."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true: the alert rules must be checked", pytrace=False)
        pytest.skip(message)
    return path


def _run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# ------------------------------------------------------------------ rules


def test_promtool_check_rules() -> None:
    out = _run("check", "rules", str(RULES))
    assert "SUCCESS" in out


def test_promtool_test_rules() -> None:
    """The unit tests of every alert: firing, and quiet where it must be."""
    out = _run("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert "SUCCESS" in out


def test_promtool_check_config(tmp_path: Path) -> None:
    """The config as Prometheus loads it beside a `haif up` data dir: its tls_config names
    the cluster CA and the monitor's certificate, which haif up writes to .haif/tls/."""
    from haif.runtime.cluster_tls import MONITOR, ensure_cluster_certs

    shutil.copytree(PROMETHEUS_CONFIG.parent, tmp_path / "monitoring" / "prometheus")
    ensure_cluster_certs(tmp_path / ".haif" / "tls", [MONITOR])
    out = _run("check", "config", str(tmp_path / "monitoring" / "prometheus" / "prometheus.yml"))
    assert "is valid prometheus config file syntax" in out


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_is_unit_tested() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts >= {
        "HaifHighErrorRate",
        "HaifTTFTBudgetBurnFast",
        "HaifTTFTBudgetBurnSlow",
        "HaifTTFTBudgetBurnTicket",
        "HaifCircuitBreakerOpen",
        "HaifDeadLettersGrowing",
        "HaifWorkersStale",
        "HaifStoreUnavailable",
    }
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert fired == alerts, f"alerts never shown firing: {sorted(alerts - fired)}"


def test_ttft_burn_rates_follow_the_workbook() -> None:
    """Multiwindow: each burn-rate alert needs a long and a short window (SRE Workbook 5-8)."""
    exprs = {r["alert"]: r["expr"] for r in _rules() if r.get("alert", "").startswith("HaifTTFT")}
    assert "ratio_rate5m > (14.4 * 0.01)" in exprs["HaifTTFTBudgetBurnFast"]
    assert "ratio_rate1h > (14.4 * 0.01)" in exprs["HaifTTFTBudgetBurnFast"]
    assert "ratio_rate30m > (6 * 0.01)" in exprs["HaifTTFTBudgetBurnSlow"]
    assert "ratio_rate6h > (6 * 0.01)" in exprs["HaifTTFTBudgetBurnSlow"]
    assert "ratio_rate6h > (1 * 0.01)" in exprs["HaifTTFTBudgetBurnTicket"]
    assert "ratio_rate3d > (1 * 0.01)" in exprs["HaifTTFTBudgetBurnTicket"]


# ------------------------------------------------------------------ dashboard


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_is_provisioning_ready() -> None:
    """File provisioning resolves no ``__inputs`` / ``${DS_...}``: the data source is a
    dashboard variable (CONVENTIONS.md, Grafana dashboards)."""
    text = DASHBOARD.read_text()
    assert "__inputs" not in text and "${DS_" not in text
    dashboard = _dashboard()
    assert dashboard["uid"] == "haif-overview" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "haif.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"


def used_expressions() -> dict[str, str]:
    """Every PromQL expression of the dashboard and the rules, by where it is."""
    exprs = {}
    dashboard = _dashboard()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            exprs[f"dashboard: {panel['title']} {target['refId']}"] = target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs[f"dashboard: ${var['name']}"] = var["definition"]
    for rule in _rules():
        name = rule.get("alert") or rule["record"]
        exprs[f"rules: {name}"] = rule["expr"]
        for text in rule.get("annotations", {}).values():
            exprs[f"rules: {name} annotation"] = text
    return exprs


def test_recorded_series_used_are_defined() -> None:
    recorded = {r["record"] for r in _rules() if "record" in r}
    for where, expr in used_expressions().items():
        for name in _RECORDED.findall(expr):
            assert name in recorded, f"{where}: {name} is recorded by no rule"


# ------------------------------------------------------------------ live cluster


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page offers: its samples', and for a family without
    samples yet (a labelled metric nothing has touched) the names it will have."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def _get(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=30, context=context) as resp:
        body: bytes = resp.read()
    return body.decode()


@pytest.mark.cluster
def test_every_metric_used_exists_on_a_live_cluster(tmp_path: Path) -> None:
    """Start `haif up`, send a few requests (plain, streamed, an unknown model), scrape the
    gateway, the orchestrator and every worker: every metric name the dashboard and the
    rules use is served, and no counter carries a `_created` twin. With internal_tls: true,
    so the certificates' expiry is among them, scraped as Prometheus scrapes it."""
    config = tmp_path / "cluster.yaml"
    config.write_text("internal_tls: true\n")
    up = UpCli(tmp_path / "d", config)
    try:
        up.complete(headers={"x-request-id": "mon-1"})
        for i in range(3):
            events = up.stream(
                "/v1/chat/completions",
                {
                    "model": "llama-3-8b",
                    "max_tokens": 6,
                    "messages": [{"role": "user", "content": f"hello {i}"}],
                },
            )
            assert events[-1] == "[DONE]", events
        status, answer = up.post("/v1/completions", {"model": "no-such-model", "prompt": "x"})
        assert status == 404, answer
        targets = json.loads(Path(up.state["prometheus_targets"]).read_text())
        # As Prometheus scrapes (prometheus.yml): https where the targets say so
        # (internal_tls: true), with the cluster CA and the monitor's certificate,
        # checking the address it names.
        scrape = ssl.create_default_context(cafile=str(up.data / "tls" / "ca.pem"))
        scrape.load_cert_chain(
            str(up.data / "tls" / "monitor.pem"), str(up.data / "tls" / "monitor.key")
        )
        pages = {
            f"{t['labels']['component']} {t['labels']['service']}": _get(
                f"{t['labels'].get('__scheme__', 'http')}://{t['targets'][0]}/metrics", scrape
            )
            for t in targets
        }
        log = (up.data / "logs" / "gateway.log").read_text()
    finally:
        up.stop()
    assert sorted(pages) == [
        "gateway gateway",
        "orchestrator orchestrator",
        "worker w1",
        "worker w2",
    ]
    served: set[str] = set()
    for where, page in pages.items():
        names = exported_names(page)
        created = sorted(n for n in names if n.endswith("_created"))
        assert not created, f"{where} serves _created series: {created}"
        served |= names
    missing = {
        f"{name} ({where})"
        for where, expr in used_expressions().items()
        for name in _METRIC.findall(expr)
        if name not in served and name not in _SYNTHETIC
    }
    assert not missing, f"used but not served: {sorted(missing)}"
    # The metrics carry the model, and the gateway logged each request in one line.
    gateway = pages["gateway gateway"]
    assert 'haif_gateway_ttft_seconds_count{model="llama-3-8b",stream="true"}' in gateway
    assert 'haif_gateway_completion_tokens_total{model="llama-3-8b",tenant="anonymous"}' in gateway
    assert 'model="unknown"' in gateway and "no-such-model" not in gateway
    [line] = [ln for ln in log.splitlines() if "request_id=mon-1 " in ln]
    for field in ("tenant=anonymous", "model=llama-3-8b", "status=200", "outcome=ok"):
        assert field in line, line
    for field in ("worker=w", "ttft_s=", "latency_s=", "prompt_tokens=2", "completion_tokens=4"):
        assert field in line, line
